"""Async scheduling on vs off, in one process on one GPU: the Llama-3.1-8B preset engine built once.

Usage (GPU machine, repo root): PYTHONPATH=. python3 benchmarks/gpu_async_ab.py --out $OUT
Alternates the engine's `async_scheduling` between runs (the engine is idle in between, so nothing is
in flight; each run starts with an empty prefix cache), over batch-1 decode and the 1,000 x 128/128 offline scenario; writes async_ab.json with
tok/s, the step phases, the GPU idle time per step and whether both modes produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.serve.bench_offline import random_prompts

logger = logging.getLogger("fxllm.gpu.async_ab")


def _stats(llm: LLM) -> dict[str, float]:
    stats = llm.engine.stats
    return {
        f.name: getattr(stats, f.name)
        for f in fields(stats)
        if isinstance(getattr(stats, f.name), (int, float))
    }


def _run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[dict[str, Any], list[list[int]]]:
    # Every run starts from an empty prefix cache: the same prompts again would otherwise skip their prefill.
    llm.engine.kv_cache.reset_prefix_cache()
    before = _stats(llm)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = _stats(llm)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    steps = max(delta.get("num_steps", 0), 1)
    tokens = [o.outputs[0].token_ids for o in outs]
    result = {
        "output_tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "steps": steps,
        "ms_per_step": 1e3 * seconds / steps,
        **{f"{k}_ms_per_step": 1e3 * v / steps for k, v in delta.items() if k.endswith("_seconds")},
    }  # fmt: skip
    return result, tokens


def main() -> int:
    """Build the engine once; alternate async off/on over the scenarios; write async_ab.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--set", action="append", default=[], help="config overrides, e.g. scheduler.max_num_seqs=512"
    )
    parser.add_argument("--modes", default="off,on", help="async modes to alternate: off,on | on | off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    config = load_config(None, ["model.model=llama-3.1-8b", "model.device=cuda", "model.dtype=bfloat16",
                                "model.max_model_len=4096", "scheduler.max_num_seqs=256",
                                "scheduler.max_num_batched_tokens=8192", *args.set])  # fmt: skip
    llm = LLM(config=config)
    vocab = llm.engine.vocab_size
    single = random_prompts(1, 128, vocab, 4)
    batch = random_prompts(1000, 128, vocab, 10)
    llm.generate(single, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    results: dict[str, Any] = {"overrides": args.set, "rounds": []}
    out_file = Path(args.out) / "async_ab.json"
    tokens: dict[bool, list[list[int]]] = {}
    for round_index in range(args.rounds):
        for mode in [m == "on" for m in args.modes.split(",")]:
            llm.engine.async_scheduling = mode
            b1, _ = _run(llm, single, 128)
            tp, toks = _run(llm, batch, 128)
            tokens.setdefault(mode, toks)
            row = {"round": round_index, "async": mode, "batch1_decode": b1, "throughput_1000x128x128": tp}
            logger.info("async=%s: batch-1 %.1f tok/s (%.2f ms/step), 1000x128/128 %.0f tok/s", mode,
                        b1["output_tok_s"], b1["ms_per_step"], tp["output_tok_s"])  # fmt: skip
            results["rounds"].append(row)
            out_file.write_text(json.dumps(results, indent=1))
    if len(tokens) == 2:
        same = [a == b for a, b in zip(tokens[False], tokens[True])]
        results["same_tokens_fraction"] = sum(same) / len(same)
    out_file.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
