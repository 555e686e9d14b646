"""Decode attention under Nsight Compute: one profiled launch per (case, cache dtype, variant) (issue 15).

The sweep (gpu_decode_sweep.py) says how long each key loop takes; this says why: run under `ncu` with
`--profile-from-start off`, each target is compiled and warmed outside the profiled range, then launched once
between cudaProfilerStart / Stop, so the report holds exactly one `_decode_kernel` launch per target, in the
order given. Cases and variants are the sweep's (CASES, VARIANTS).

Usage (GPU machine, repo root):
    ncu --clock-control none --profile-from-start off --set full -o $OUT/decode \
        python3 benchmarks/gpu_decode_ncu.py --targets "1000 x 129-256:fp8:swap_ab_wide,1000 x 129-256:bf16:default"
A target is CASE:KV:VARIANT[:BLOCK_NxWARPSxSTAGES[rMAX_REGISTERS]]. Without ncu it prints each launch's time (do_bench).
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode_sweep import CASES, VARIANTS, decode_case, kv_bytes, kv_cache, rope_tables

from fxllm.backends.triton import paged_attention as tpa

logger = logging.getLogger("fxllm.gpu.decode_ncu")


def parse_target(text: str) -> tuple[str, str, str, dict[str, int]]:
    """'CASE:KV:VARIANT[:NxWxS]' -> (case, kv, variant, launch knobs); names checked against the sweep's."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"target {text!r}: want CASE:KV:VARIANT[:BLOCK_NxWARPSxSTAGES]")
    case, kv, variant = parts[:3]
    if case not in CASES or kv not in ("bf16", "fp8") or variant not in VARIANTS:
        raise ValueError(
            f"target {text!r}: case in {sorted(CASES)}, kv in bf16/fp8, variant in {sorted(VARIANTS)}"
        )
    if kv not in VARIANTS[variant][1]:
        raise ValueError(f"target {text!r}: variant {variant} runs on {VARIANTS[variant][1]} caches only")
    launch: dict[str, int] = {}
    if len(parts) == 4:  # NxWxS, or NxWxSrR with a register cap R
        knobs, _, cap = parts[3].partition("r")
        n, w, s = (int(x) for x in knobs.split("x"))
        launch = {"block_n": n, "num_warps": w, "num_stages": s}
        if cap:
            launch["max_registers"] = int(cap)
    return case, kv, variant, launch


def main() -> int:
    """Warm every target, then launch each once inside the profiled range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", required=True, help="comma-separated CASE:KV:VARIANT[:NxWxS]")
    parser.add_argument(
        "--rope", action="store_true", help="the fused RoPE op's launch, as an engine runs decode"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    targets = [parse_target(t) for t in args.targets.split(",")]
    runs = []
    for case, kv, variant, launch in targets:
        c, ctx = decode_case(*CASES[case], "cuda")
        kc, vc, scales = kv_cache(c, kv)
        out = torch.empty_like(c.q)
        tables = rope_tables(c.q.shape[0], "cuda") if args.rope else {}
        run = partial(tpa.paged_attention_out, c.q, c.k, c.v, kc, vc, c.slot_mapping, c.block_tables, c.seq_lens,
                      c.query_start_loc, c.scale, -1, 0.0, None, out, **launch, **scales,
                      **VARIANTS[variant][0], **tables)  # fmt: skip
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        from triton.testing import do_bench

        us = 1e3 * float(do_bench(run, warmup=10, rep=40))
        logger.info(
            "%s %s %s %s: %.1f us, %.2f TB/s of KV",
            case,
            kv,
            variant,
            launch,
            us,
            kv_bytes(ctx, kv) / us / 1e6,
        )
        runs.append(run)
    torch.cuda.synchronize()
    for run in runs:  # every target compiled and timed above: the profiled range holds one launch of each
        torch.cuda.profiler.start()
        run()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
