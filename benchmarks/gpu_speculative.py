"""Speculative decoding's machinery on one GPU (issue 16): an oracle drafter, k = 1, 2, 4, 8, batch 1 and 32.

Usage (GPU machine, repo root): PYTHONPATH=. python3 benchmarks/gpu_speculative.py --out $OUT
(--cpu-check runs the same on tiny-llama on the CPU in a minute, to check the script itself.)

With random weights acceptance means nothing, so the drafts are the target's own greedy continuation
(computed first without speculation): every draft of a greedy request should be accepted, and tok/s
shows what verification costs and gains at its best (ideal ~(k + 1)x at batch 1). Plain decoding runs
with async scheduling on (the GPU default) and off; speculation runs synchronous steps. The verify step's
cost: wall ms per engine step of a speculative run (a (1 + k) x B verify step, no CUDA graph: the decode
graphs are captured for 1-token steps only) against a plain decode step (CUDA graph). Writes
speculative.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.runtime.speculative.oracle import OracleProposer
from fxllm.serve.bench_offline import random_prompts

logger = logging.getLogger("fxllm.gpu.speculative")


def _run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[dict[str, Any], list[list[int]]]:
    """Generate greedily from an empty prefix cache; tok/s, steps and ms per step."""
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    steps0, spec0 = engine.stats.num_steps, engine.speculator.stats if engine.speculator else None
    drafted0 = spec0.draft_tokens if spec0 else 0
    accepted0 = spec0.accepted_tokens if spec0 else 0
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    steps = max(engine.stats.num_steps - steps0, 1)
    tokens = [o.outputs[0].token_ids for o in outs]
    row: dict[str, Any] = {"output_tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "steps": steps,
                           "ms_per_step": 1e3 * seconds / steps}  # fmt: skip
    if spec0 is not None:
        drafted = spec0.draft_tokens - drafted0
        row["acceptance"] = (spec0.accepted_tokens - accepted0) / drafted if drafted else None
    return row, tokens


def main() -> int:
    """Build the engine once; plain runs give the oracle's drafts; then every k at every batch size."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu-check", action="store_true", help="tiny-llama on the CPU (checks the script)")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    base = (
        ["model.model=tiny-llama", "model.device=cpu", "model.dtype=float32", "compile.backend=eager"]
        if args.cpu_check
        else [
            "model.model=llama-3.1-8b",
            "model.device=cuda",
            "model.dtype=bfloat16",
            "model.max_model_len=4096",
        ]
    )
    config = load_config(None, [*base, "speculative.method=ngram", "speculative.disable_batch_size=0",
                                "speculative.min_acceptance_rate=0", *args.set])  # fmt: skip
    llm = LLM(config=config)
    engine = llm.engine
    spec_config = engine.speculator.config  # type: ignore[union-attr]
    vocab = engine.vocab_size
    ks = [int(k) for k in args.ks.split(",")]
    out_file = Path(args.out) / "speculative.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": base + args.set, "output_len": args.output_len, "rows": []}
    table = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = random_prompts(batch, 128, vocab, 7 + batch)
        engine.speculator = None
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm
        for round_index in range(args.rounds):
            plain: dict[str, Any] = {}
            for async_on in (True, False):
                engine.speculator, engine.async_scheduling = None, async_on
                plain[f"async_{'on' if async_on else 'off'}"], want = _run(llm, prompts, args.output_len)
            engine.async_scheduling = False
            oracle = OracleProposer({tuple(p): w for p, w in zip(prompts, want)})
            for k in ks:
                spec_config.num_speculative_tokens = k
                engine.speculator = SpeculativeDecoder(spec_config, oracle)
                row, got = _run(llm, prompts, args.output_len)
                row.update(batch=batch, k=k, round=round_index,
                           same_tokens=sum(a == b for a, b in zip(got, want)) / batch,
                           speedup_vs_async=row["output_tok_s"] / plain["async_on"]["output_tok_s"],
                           speedup_vs_sync=row["output_tok_s"] / plain["async_off"]["output_tok_s"],
                           verify_step_vs_decode_step=row["ms_per_step"] / plain["async_off"]["ms_per_step"])  # fmt: skip
                results["rows"].append({"plain": plain, **row})
                table.append(row)
                logger.info("batch %d k %d: %.1f tok/s (%.2fx async plain, %.2fx sync plain), acceptance %s, "
                            "step %.2f ms vs %.2f ms", batch, k, row["output_tok_s"], row["speedup_vs_async"],
                            row["speedup_vs_sync"], row["acceptance"], row["ms_per_step"],
                            plain["async_off"]["ms_per_step"])  # fmt: skip
                out_file.write_text(json.dumps(results, indent=1))
    engine.speculator = None
    print(
        f"{'batch':>5} {'k':>2} {'tok/s':>9} {'x async':>8} {'x sync':>7} {'accept':>7} {'same':>5} {'step/decode':>11}"
    )
    for r in table:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"{r['batch']:>5} {r['k']:>2} {r['output_tok_s']:>9.1f} {r['speedup_vs_async']:>8.2f} "
              f"{r['speedup_vs_sync']:>7.2f} {acc:>7} {r['same_tokens']:>5.2f} {r['verify_step_vs_decode_step']:>11.2f}")  # fmt: skip
    out_file.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
