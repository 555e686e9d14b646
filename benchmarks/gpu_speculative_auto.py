"""Does speculation switch itself off where it does not pay? (issue 16, scope 5) One GPU, the 8B preset.

Usage (GPU machine, repo root; about 5 minutes on one H100 from a cold compile cache, --max-seconds caps it):
    PYTHONPATH=. python3 benchmarks/gpu_speculative_auto.py --out $OUT
    PYTHONPATH=. python3 benchmarks/gpu_speculative_auto.py --smoke --out /tmp/auto_smoke   # tiny-llama, CPU

With random weights acceptance means nothing, so the drafts are made to be accepted a fixed number of tokens
per verify step: a partial oracle drafts the first `accept` tokens of the target's own greedy continuation
(computed first without speculation) and then wrong ones, k = 4 in all. Per batch size and `accept`, the
same prompts run plain (async scheduling on, the GPU default, and off), speculating on every step
(auto_disable=off) and with the cost switch (auto_disable=on; one short run first so its estimates are
measured, as a running server's are). The switch should be near the faster of plain and always-on:
`auto_vs_best` = auto tok/s / max(plain async off, always-on) (>= 0.95 wanted; plain async on is reported
as well: auto's plain steps run synchronously while a speculator is attached). Also: the switch's counters
(steps speculated / skipped by cost / explored) and its estimates (verify and decode step ms per batch bucket).
Writes speculative_auto.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.serve.bench_offline import random_prompts

logger = logging.getLogger("fxllm.gpu.speculative_auto")


class PartialOracle:
    """Drafts `accept` tokens of the known greedy continuation, then wrong ones: exactly `accept` accepted."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], accept: int, vocab: int) -> None:
        self.continuations, self.accept, self.vocab = continuations, accept, vocab

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence `limit` drafts: the first `accept` right, the rest the right token + 1."""
        drafts = []
        for seq, limit in zip(seqs, limits):
            follow = self.continuations.get(tuple(seq.token_ids[: seq.num_prompt_tokens]), [])
            done = seq.num_output_tokens
            right = follow[done : done + limit]
            drafts.append([t if i < self.accept else (t + 1) % self.vocab for i, t in enumerate(right)])
        return drafts


def _run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    """Greedy generation from an empty prefix cache: output tok/s and the tokens."""
    engine = llm.engine
    engine.kv_cache.reset_prefix_cache()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(map(len, tokens)) / seconds, tokens


def main() -> int:
    """Plain, always-on and auto speculation per batch size and accepted length; writes the JSON, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--accepts", default="0,1,2,4", help="drafts accepted per verify step (k = 4)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny-llama on the CPU (checks the script)")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument(
        "--max-seconds", type=float, default=420.0, help="start no new case after this (total)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    batches = [int(b) for b in args.batches.split(",")]
    accepts = [int(a) for a in args.accepts.split(",")]
    if args.smoke:
        batches, accepts, args.output_len = batches[:2], accepts[:2], 16
    sizes = ",".join(map(str, batches))
    gpu = ["model.model=llama-3.1-8b", "model.device=cuda", "model.dtype=bfloat16", "model.max_model_len=4096",
           f"compile.cuda_graph_batch_sizes=[{sizes}]"]  # fmt: skip
    cpu = ["model.model=tiny-llama", "model.device=cpu", "model.dtype=float32", "compile.backend=eager"]
    base = cpu if args.smoke else gpu
    overrides = [*base, "speculative.method=ngram", "speculative.num_speculative_tokens=4",
                 "speculative.disable_batch_size=0", "speculative.min_acceptance_rate=0", *args.set]  # fmt: skip
    start = time.perf_counter()
    llm = LLM(config=load_config(None, overrides))
    engine = llm.engine
    build_seconds = time.perf_counter() - start
    assert engine.speculator is not None
    auto_config = dataclasses.replace(engine.speculator.config, auto_disable="on")
    on_config = dataclasses.replace(engine.speculator.config, auto_disable="off")
    async_default = engine.speculator.async_was_on
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": overrides, "output_len": args.output_len, "build_seconds": build_seconds,
                               "device": str(engine.runner.device), "rows": []}  # fmt: skip
    if engine.runner.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for batch in batches:
        prompts = random_prompts(batch, 128, engine.vocab_size, 7 + batch)
        plain: dict[str, float] = {}
        want: list[list[int]] = []
        for async_on in (True, False):
            engine.speculator, engine.async_scheduling = None, async_on and async_default
            plain[f"async_{'on' if async_on else 'off'}"], want = _run(llm, prompts, args.output_len)
        engine.async_scheduling = False
        continuations = {tuple(p): w for p, w in zip(prompts, want)}
        for accept in accepts:
            if time.perf_counter() - start > args.max_seconds:
                results["cut_short"] = f"stopped before batch {batch} accept {accept}"
                logger.warning("--max-seconds %.0f reached: %s", args.max_seconds, results["cut_short"])
                break
            proposer = PartialOracle(continuations, accept, engine.vocab_size)
            row: dict[str, Any] = {"batch": batch, "accept": accept, "plain_tok_s": plain}
            for mode, config in (("on", on_config), ("auto", auto_config)):
                spec = SpeculativeDecoder(config, proposer)
                engine.speculator = spec
                if mode == "auto":  # a server's estimates are measured already: a short run first
                    _run(llm, prompts, min(32, args.output_len))
                    spec.stats = type(spec.stats)()
                rate, got = _run(llm, prompts, args.output_len)
                row[f"{mode}_tok_s"] = rate
                row[f"{mode}_same_tokens"] = sum(a == b for a, b in zip(got, want)) / len(want)
                if mode == "auto":
                    stats = spec.stats
                    row["auto_counters"] = {"speculated": stats.steps_speculated,
                                            "skipped_cost": stats.steps_skipped_cost,
                                            "explored": stats.steps_explored}  # fmt: skip
                    cost = spec.cost
                    assert cost is not None
                    row["auto_estimates_ms"] = {
                        str(b): {
                            "decode": cost.plain[b].seconds * 1e3,
                            "verify": cost.verify[b].seconds * 1e3,
                        }
                        for b in cost.plain
                    }
            engine.speculator = None
            best = max(plain["async_off"], row["on_tok_s"])
            row["auto_vs_best"] = row["auto_tok_s"] / best
            results["rows"].append(row)
            (out / "speculative_auto.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = time.perf_counter() - start
    (out / "speculative_auto.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'batch':>5} {'acc':>3} {'plain':>8} {'plain sync':>10} {'on':>8} {'auto':>8} {'auto/best':>9} "
          f"{'spec/skip/expl':>15} {'same':>5}  estimates ms (bucket: decode / verify)")  # fmt: skip
    for r in results["rows"]:
        c = r["auto_counters"]
        est = " ".join(f"{b}: {e['decode']:.1f}/{e['verify']:.1f}" for b, e in r["auto_estimates_ms"].items())
        print(f"{r['batch']:>5} {r['accept']:>3} {r['plain_tok_s']['async_on']:>8.1f} {r['plain_tok_s']['async_off']:>10.1f} "
              f"{r['on_tok_s']:>8.1f} {r['auto_tok_s']:>8.1f} {r['auto_vs_best']:>8.2f}x "
              f"{c['speculated']:>5}/{c['skipped_cost']}/{c['explored']:<5} "
              f"{min(r['on_same_tokens'], r['auto_same_tokens']):>5.2f}  {est}")  # fmt: skip
    print(f"total {results['seconds']:.0f} s (engine build {build_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
