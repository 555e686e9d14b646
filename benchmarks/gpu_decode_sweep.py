"""Decode attention launch sweep at serving batch sizes, bf16 vs FP8 KV cache (issues 14, 15).

The 1,000 x 128/128 profile on one H200 (benchmarks/RESULTS.md, eleventh session) spent 1.38 s of GPU time in
the decode kernel with an FP8 KV cache against 1.13 s with a bf16 one: ~1.2 TB/s of KV read where bf16 reads
~2.8. This times the decode kernel (KV write + split-KV attention + combine) on Llama-3.1-8B heads (32 query,
8 KV heads, head dim 128, block 16) for each launch in a grid: BLOCK_N x warps x stages, and for FP8 the
e4m3 -> float16 variant (`fp8_f16`: q and the tiles in float16 instead of bfloat16). Each launch's output is
compared with the default launch's on the same cache dtype.

Usage (GPU machine, repo root; ~2-3 min on one H200):
    PYTHONPATH=. python3 benchmarks/gpu_decode_sweep.py --out $OUT
CPU check of the script (Triton's interpreter, tiny cases, two launches): add --smoke.
Writes DIR/decode_sweep.json and prints the best launch per case and cache dtype.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # Triton's interpreter: set before any kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import itertools
import json
import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fxllm.backends.triton import paged_attention as tpa
from fxllm.backends.triton.selfcheck import make_paged_case
from fxllm.ops.kv_quant import quantize_kv

logger = logging.getLogger("fxllm.gpu.decode_sweep")
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
# Sequences x context lengths: the 1,000 x 128/128 run's middle (contexts 129-256), mid and long batches.
CASES = {"1000 x 129-256": (1000, 129, 256), "256 x 1024": (256, 1024, 1024), "64 x 2048": (64, 2048, 2048)}
SMOKE_CASES = {"4 x 20-40": (4, 20, 40)}


def _time_us(fn: Any) -> float:
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=10, rep=40))


def _launches(smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        return [{}, {"block_n": 32, "num_warps": 4, "num_stages": 2}]
    grid = itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
    return [{}] + [{"block_n": n, "num_warps": w, "num_stages": s} for n, w, s in grid]


def sweep(cases: dict[str, tuple[int, int, int]], smoke: bool, device: str) -> dict[str, Any]:
    """Per case and cache dtype: every launch's time, KV read rate and difference from the default launch."""
    results: dict[str, Any] = {}
    one = torch.ones(1, device=device)
    for name, (seqs, lo, hi) in cases.items():
        rng = random.Random(0)
        ctx = [rng.randint(lo, hi) for _ in range(seqs)]
        c = make_paged_case([1] * seqs, ctx, HEADS, KV_HEADS, HEAD_DIM, block_size=BLOCK,
                            dtype=torch.bfloat16, device=device, seed=1)  # fmt: skip
        meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
        caches = {
            "bf16": (c.k_cache_ref.clone(), c.v_cache_ref.clone(), {}),
            "fp8": (quantize_kv(c.k_cache_ref, one), quantize_kv(c.v_cache_ref, one), {"k_scale": one, "v_scale": one}),
        }  # fmt: skip
        rows = []
        for dtype_name, (kc, vc, scales) in caches.items():
            variants = [False, True] if dtype_name == "fp8" else [False]
            reference = None
            for fp8_f16, launch in itertools.product(variants, _launches(smoke)):
                out = torch.empty_like(c.q)
                kwargs = {**launch, **scales, "fp8_f16": fp8_f16}

                run = partial(
                    tpa.paged_attention_out, c.q, c.k, c.v, kc, vc, *meta, -1, 0.0, None, out, **kwargs
                )
                try:
                    run()
                    if reference is None:
                        reference = out.clone()
                    diff = float((out.float() - reference.float()).abs().max())
                    us = _time_us(run) if device == "cuda" else 0.0
                except Exception as exc:  # a launch the compiler rejects (e.g. shared memory): keep going
                    rows.append({"kv": dtype_name, "fp8_f16": fp8_f16, **launch, "error": str(exc)[:300]})
                    continue
                kv_bytes = sum(ctx) * KV_HEADS * HEAD_DIM * 2 * (1 if dtype_name == "fp8" else 2)
                rows.append({"kv": dtype_name, "fp8_f16": fp8_f16, **launch, "us": us, "max_diff": diff,
                             "kv_TBps": kv_bytes / (us * 1e-6) / 1e12 if us else None})  # fmt: skip
                logger.info("%s %s", name, rows[-1])
        results[name] = rows
    return results


def _print(results: dict[str, Any]) -> None:
    for name, rows in results.items():
        for kv in ("bf16", "fp8"):
            mine = [r for r in rows if r["kv"] == kv and "us" in r]
            if not mine:
                continue
            default = next(r for r in mine if "block_n" not in r and not r["fp8_f16"])
            best = min(mine, key=lambda r: r["us"] or float("inf"))
            print(f"{name:>16} {kv:>5}: default {default['us']:8.1f} us ({default['kv_TBps'] or 0:.2f} TB/s), "
                  f"best {best['us']:8.1f} us ({best['kv_TBps'] or 0:.2f} TB/s) with "
                  f"{ {k: best.get(k) for k in ('block_n', 'num_warps', 'num_stages', 'fp8_f16')} }, "
                  f"max diff {max(r['max_diff'] for r in mine):.3g}")  # fmt: skip
            if kv == "fp8":
                f16 = [r for r in mine if r["fp8_f16"] and "block_n" not in r]
                if f16:
                    print(f"{'':>16} fp8 default launch with fp8_f16: {f16[0]['us']:8.1f} us")


def main() -> int:
    """Run the sweep; JSON to --out, a summary on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny cases")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    device = "cpu" if args.smoke else "cuda"
    results = sweep(SMOKE_CASES if args.smoke else CASES, args.smoke, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_sweep.json").write_text(json.dumps(results, indent=1))
    _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
