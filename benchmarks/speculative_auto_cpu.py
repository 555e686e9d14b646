"""Speculation on / off / auto on the CPU (issue 16, scope 5): batch-1 decode tok/s in one process.

One SmolLM2 engine (float32); three modes share it: plain (no speculator), n-gram always on
(speculative.auto_disable=off) and n-gram with the cost switch (auto_disable=on, estimates kept across the
runs as a server keeps them). Runs go prompt by prompt, the modes interleaved and their order reversed
every repeat, so the shared box's drift hits every mode alike. Prompts: the one where n-gram loses (add
type hints: most lines change), a mixed one (docstrings: bad, then good stretches) and input-grounded ones
where it wins (rewrite / copy). Greedy, so every mode
must give the same tokens (mismatches are counted). The load average is recorded before and after.

    PYTHONPATH=. python benchmarks/speculative_auto_cpu.py --out /tmp/spec_auto --backend eager --threads 1
    PYTHONPATH=. python benchmarks/speculative_auto_cpu.py --out /tmp/spec_auto_smoke --smoke   # a minute: the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative_cpu import PROMPTS, chat, run_one

from fxllm.llm import LLM
from fxllm.runtime.speculative.decoder import SpeculativeDecoder

logger = logging.getLogger("speculative_auto_cpu")

CASES = {"type-hints": 3, "docstrings": 5, "rewrite": 0, "copy-replace": 1}  # name -> index into PROMPTS
MODES = ("plain", "on", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--k", type=int, default=4, help="speculative.num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--set", action="append", default=[], help="more config overrides (section.key=value)"
    )
    parser.add_argument("--smoke", action="store_true", help="8 tokens, 1 repeat, 1 case: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.max_tokens, args.repeats, args.cases = 8, 1, "type-hints"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)  # see speculative_cpu.py: 2 threads on a loaded box stall M > 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    overrides = [f"model.model={args.model}", "model.dtype=float32", f"compile.backend={args.backend}",
                 "speculative.method=ngram", f"speculative.num_speculative_tokens={args.k}", *args.set]  # fmt: skip
    llm = LLM(overrides=overrides)
    engine = llm.engine
    auto: SpeculativeDecoder = engine.speculator  # type: ignore[assignment]
    assert auto is not None and auto.cost is not None, "the engine's speculator must have auto_disable=on"
    on = SpeculativeDecoder(dataclasses.replace(auto.config, auto_disable="off"), auto.proposer)
    modes: dict[str, SpeculativeDecoder | None] = {"plain": None, "on": on, "auto": auto}
    cases = [c for c in args.cases.split(",") if c]
    prompts = {c: chat(engine.tokenizer, PROMPTS[CASES[c]]) for c in cases}

    rates: dict[str, dict[str, list[float]]] = {c: {m: [] for m in MODES} for c in cases}
    # Tokens per CPU-second of this process over the whole request (prefill included, alike in all modes):
    # on an oversubscribed box wall time follows the other processes; 1-thread CPU time less so (cache and
    # core sharing still move it).
    cpu_rates: dict[str, dict[str, list[float]]] = {c: {m: [] for m in MODES} for c in cases}
    tokens: dict[str, dict[str, list[int]]] = {c: {} for c in cases}
    counters: dict[str, dict[str, Any]] = {c: {} for c in cases}
    for rep in range(args.repeats):
        for case in cases:
            for mode in MODES if rep % 2 == 0 else tuple(reversed(MODES)):
                spec = modes[mode]
                engine.speculator = spec
                engine.kv_cache.reset_prefix_cache()  # every run prefills its prompt
                before = dict(vars(spec.stats)) if spec is not None else {}
                cpu = time.process_time()
                toks, rate, m = run_one(llm, prompts[case], args.max_tokens)
                cpu_rates[case][mode].append(len(toks) / (time.process_time() - cpu))
                rates[case][mode].append(rate)
                tokens[case].setdefault(mode, toks)
                if spec is not None:
                    delta = {k: v - before[k] for k, v in vars(spec.stats).items()}
                    counters[case].setdefault(mode, []).append(delta)
                logger.info("rep %d %s %s: %d tokens, %.2f tok/s, accepted length %s", rep, case, mode,
                            len(toks), rate, m.spec_mean_accepted_length)  # fmt: skip

    results: dict[str, Any] = {"model": args.model, "k": args.k, "max_tokens": args.max_tokens,
                               "repeats": args.repeats, "threads": args.threads, "backend": args.backend,
                               "load_before": load_before, "load_after": os.getloadavg(), "cases": {}}  # fmt: skip
    print(f"\n{'case':<14} {'plain tok/s':>11} {'on tok/s':>9} {'auto tok/s':>10} {'on/plain':>9} "
          f"{'auto/plain':>10} {'auto/on':>8}  auto: speculated / skipped / explored steps, mismatches")  # fmt: skip
    for case in cases:
        med = {m: statistics.median(rates[case][m]) for m in MODES}
        cpu_med = {m: statistics.median(cpu_rates[case][m]) for m in MODES}
        auto_counts = counters[case].get("auto", [])
        total = {k: sum(c[k] for c in auto_counts) for k in ("steps_speculated", "steps_skipped_cost",
                                                              "steps_explored")}  # fmt: skip
        mismatches = sum(tokens[case][m] != tokens[case]["plain"] for m in ("on", "auto"))
        results["cases"][case] = {
            "tok_s": rates[case],
            "tok_per_cpu_s": cpu_rates[case],
            "cpu_on_vs_plain": cpu_med["on"] / cpu_med["plain"],
            "cpu_auto_vs_plain": cpu_med["auto"] / cpu_med["plain"],
            "median_tok_s": med,
            "on_vs_plain": med["on"] / med["plain"],
            "auto_vs_plain": med["auto"] / med["plain"],
            "auto_vs_on": med["auto"] / med["on"],
            "auto_counters": total,
            "on_counters": counters[case].get("on", []),
            "token_mismatches": mismatches,
        }
        r = results["cases"][case]
        print(f"{case:<14} {med['plain']:>11.2f} {med['on']:>9.2f} {med['auto']:>10.2f} {r['on_vs_plain']:>8.2f}x "
              f"{r['auto_vs_plain']:>9.2f}x {r['auto_vs_on']:>7.2f}x  {total['steps_speculated']} / "
              f"{total['steps_skipped_cost']} / {total['steps_explored']}, {mismatches}; per CPU-second: "
              f"on {r['cpu_on_vs_plain']:.2f}x, auto {r['cpu_auto_vs_plain']:.2f}x")  # fmt: skip
    cost = auto.cost
    results["auto_estimates_ms"] = {
        str(b): {"plain": cost.plain[b].seconds * 1e3, "verify": cost.verify[b].seconds * 1e3}
        for b in cost.plain
        if cost.plain[b].samples and cost.verify[b].samples
    }
    print(f"load average before {load_before}, after {results['load_after']}; auto's estimates (ms) "
          f"{results['auto_estimates_ms']}")  # fmt: skip
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
