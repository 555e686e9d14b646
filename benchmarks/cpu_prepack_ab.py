"""CPU decode speed of the three ways to run plain linears, interleaved in one process (issue 13).

Variants: `freeze` (Inductor freezes the graph, oneDNN packs the weights inside it: never cached),
`off` (no freezing, plain aten.linear: cached, slower), `prepack` (the default: fxllm_cpu::onednn_linear
over weights packed on their first call, no freezing: cached). Each variant is built once, then
rounds of batch-1 decode and 16-request decode run in turn across the variants, so load from
other processes on a shared box hits each alike. Writes `prepack_ab.json` under --out and prints a table.

    PYTHONPATH=. python benchmarks/cpu_prepack_ab.py --out /tmp/ab            # SmolLM2, ~20 min on 2 cores
    PYTHONPATH=. python benchmarks/cpu_prepack_ab.py --out /tmp/ab --smoke    # tiny-llama, ~2 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    "freeze": ["compile.cpu_freezing=on", "compile.op_backends.linear=torch"],
    "off": ["compile.cpu_freezing=off", "compile.op_backends.linear=torch"],
    "prepack": [],  # the default: cpu_freezing=auto, which does not freeze once oneDNN took every linear
}


def _decode(llm: Any, batch: int, tokens: int) -> tuple[float, list[list[int]]]:
    """Generated tokens per second for `batch` greedy requests of `tokens` new tokens each."""
    from fxllm.runtime.sampling_params import SamplingParams

    prompts = [[1, 100 + i, 200 + 3 * i, 300 + 7 * i] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    return batch * tokens / seconds, [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    """Build each variant, then interleave decode rounds; print and save the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny-llama, 1 round, few tokens")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.smoke:
        args.model, args.rounds, args.tokens = "tiny-llama", 1, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fxllm.llm import LLM

    llms: dict[str, Any] = {}
    result: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "load_start": os.getloadavg()[0],
                              "variants": {}}  # fmt: skip
    for name in args.variants.split(","):
        start = time.perf_counter()
        llm = LLM(overrides=[f"model.model={args.model}", "cache.cpu_kv_bytes=134217728", *VARIANTS[name]])
        _decode(llm, 1, 4)  # the first call compiles (or loads) the graph and packs the weights
        graph = llm.engine.runner._forward
        result["variants"][name] = {
            "build_s": time.perf_counter() - start,
            "graph": getattr(graph, "source", type(graph).__name__),
            "op_backends": dict(llm.info.op_backends),
            "b1": [], "b16": [],
        }  # fmt: skip
        llms[name] = llm
    tokens: dict[str, Any] = {}
    for _ in range(args.rounds):
        for name, llm in llms.items():
            for batch, key in ((1, "b1"), (16, "b16")):
                rate, ids = _decode(llm, batch, args.tokens)
                logging.info("%s batch %d: %.1f tok/s (load %.1f)", name, batch, rate, os.getloadavg()[0])
                result["variants"][name][key].append(rate)
                tokens.setdefault(name, {})[key] = ids
    first = next(iter(tokens.values()))
    for name, row in result["variants"].items():
        row["same_tokens_as_first"] = tokens[name] == first
    result["load_end"] = os.getloadavg()[0]
    (out / "prepack_ab.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"{args.model}, {args.tokens} tokens, load {result['load_start']:.1f} -> {result['load_end']:.1f}")
    print(f"{'variant':<10}{'build s':>9}{'graph':>11}{'b1 tok/s':>10}{'b16 tok/s':>11}  same tokens  rounds")
    for name, row in result["variants"].items():
        print(f"{name:<10}{row['build_s']:>9.1f}{row['graph']:>11}{statistics.median(row['b1']):>10.1f}"
              f"{statistics.median(row['b16']):>11.1f}  {row['same_tokens_as_first']!s:<11}  "
              f"b1 {[round(r, 1) for r in row['b1']]} b16 {[round(r, 1) for r in row['b16']]}")  # fmt: skip


if __name__ == "__main__":
    main()
