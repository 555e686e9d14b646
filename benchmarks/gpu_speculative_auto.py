"""Does speculation switch itself off where it does not pay? (issue 16, scope 5) One GPU, the 8B preset.

Usage (GPU machine, repo root; about 5 minutes on one H100 from a cold compile cache, --max-seconds caps it):
    PYTHONPATH=. python3 benchmarks/gpu_speculative_auto.py --out $OUT
    PYTHONPATH=. python3 benchmarks/gpu_speculative_auto.py --smoke --out /tmp/auto_smoke   # tiny-llama, CPU

With random weights acceptance means nothing, so the drafts are made to be accepted a fixed number of tokens
per verify step: the model's greedy output is forced (gpu_speculative.forced_model, oracle.force_chain_) and a
partial oracle drafts the first `accept` tokens of the forced chain from each sequence's own last token and then
wrong ones, k = 4 in all (drafting the plain run's tokens lost the path on bf16 near-ties). Per batch size and `accept`, the
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

from benchmarks.gpu_speculative import forced_model
from benchmarks.gpu_speculative_common import base_overrides, build_llm, run_greedy
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.runtime.speculative.oracle import ChainOracle
from fxllm.serve.bench_offline import random_prompts

logger = logging.getLogger("fxllm.gpu.speculative_auto")


class PartialOracle:
    """Drafts the forced chain from each sequence's own last token, `accept` right and the rest wrong."""

    def __init__(self, accept: int, vocab: int) -> None:
        self.accept, self.vocab = accept, vocab

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Per sequence `limit` drafts: the first `accept` the chain's, the rest the chain's token + 1."""
        drafts = []
        for seq, limit in zip(seqs, limits):
            right = ChainOracle(self.vocab).propose([seq], [limit])[0]
            drafts.append([t if i < self.accept else (t + 1) % self.vocab for i, t in enumerate(right)])
        return drafts


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
    overrides = [*base_overrides(args.smoke), f"compile.cuda_graph_batch_sizes=[{sizes}]", "speculative.method=ngram", "speculative.num_speculative_tokens=4",
                 "speculative.disable_batch_size=0", "speculative.min_acceptance_rate=0", *args.set]  # fmt: skip
    start = time.perf_counter()
    model, vocab = forced_model(args.smoke)  # greedy output forced: the drafts' acceptance is exact
    llm = build_llm(overrides, model, batches, args.smoke)
    del model
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
            run, want = run_greedy(llm, prompts, args.output_len)
            plain[f"async_{'on' if async_on else 'off'}"] = run["output_tok_s"]
        engine.async_scheduling = False
        for accept in accepts:
            if time.perf_counter() - start > args.max_seconds:
                results["cut_short"] = f"stopped before batch {batch} accept {accept}"
                logger.warning("--max-seconds %.0f reached: %s", args.max_seconds, results["cut_short"])
                break
            proposer = PartialOracle(accept, vocab)
            row: dict[str, Any] = {"batch": batch, "accept": accept, "plain_tok_s": plain}
            for mode, config in (("on", on_config), ("auto", auto_config)):
                spec = SpeculativeDecoder(config, proposer)
                engine.speculator = spec
                if mode == "auto":  # a server's estimates are measured already: a short run first
                    run_greedy(llm, prompts, min(32, args.output_len))
                    spec.stats = type(spec.stats)()
                run, got = run_greedy(llm, prompts, args.output_len)
                row[f"{mode}_tok_s"] = run["output_tok_s"]
                row[f"{mode}_acceptance"] = run["acceptance"]
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
