"""Decode-sized GEMMs on the GPU: fxllm's Triton GEMV against cuBLAS (F.linear), Llama-3.1-8B shapes.

For M in 1, 2, 4, 8, 16 rows and each projection (weights [N, K], bf16): time per call inside a CUDA
graph (no launch overhead: `do_bench_cudagraph`), the weight bytes over that time in TB/s, and a check
against F.linear. With --sweep, a grid of launch sizes at M = 1 and 8.

    python benchmarks/gpu_gemv.py --out DIR [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("fxllm.gpu.gemv")

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # fmt: skip
ROWS = (1, 2, 4, 8, 16)


def _us(fn: Any) -> float:
    import triton.testing

    return 1000 * float(triton.testing.do_bench_cudagraph(fn, rep=50))


def run(sweep: bool) -> dict[str, Any]:
    """Time F.linear and the GEMV (default launch, optionally a sweep) for every shape and row count."""
    from fxllm.backends.triton import gemv

    configs: list[dict[str, int]] = [{}]
    if sweep:
        configs += [
            {"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": s}
            for bn, bk, w, s in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8), (3, 4, 5))
        ]
    results: dict[str, Any] = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        gbytes = n * k * 2 / 1e9
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            row: dict[str, Any] = {}
            cublas = _us(lambda x=x, w=w: F.linear(x, w))
            row["cublas_us"], row["cublas_tbs"] = cublas, gbytes / cublas * 1e3 / 1e3
            out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            for launch in configs if rows in (1, 8) else [{}]:
                label = "gemv" + ("" if not launch else " " + ",".join(f"{a}={b}" for a, b in launch.items()))
                try:
                    gemv.gemv_out(x, w, None, out, **launch)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not err < 1e-2:
                        row[label] = {"error": f"rel err {err:.3g}"}
                        continue
                    us = _us(
                        lambda x=x, w=w, out=out, launch=launch: gemv.gemv_out(x, w, None, out, **launch)
                    )
                except Exception as exc:
                    row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    continue
                row[label] = {"us": us, "tbs": gbytes / us * 1e3 / 1e3, "vs_cublas": cublas / us}
            timed = {key: v for key, v in row.items() if isinstance(v, dict) and "us" in v}
            if timed:
                best = min(timed, key=lambda key: timed[key]["us"])
                row["best"] = {"label": best, **timed[best]}
            logger.info("%s M=%d: cuBLAS %.1f us (%.2f TB/s); default %s; best %s", name, rows, cublas,
                        row["cublas_tbs"], row.get("gemv"), row.get("best"))  # fmt: skip
            results[f"{name} M={rows}"] = row
    return results


def main() -> int:
    """Parse arguments, run, write gemv.json under --out, print a summary line per case."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    results = {"device": torch.cuda.get_device_name(0), **run(args.sweep)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemv.json").write_text(json.dumps(results, indent=1))
    for case, row in results.items():
        if isinstance(row, dict):
            print(
                case,
                "cublas_us",
                round(row["cublas_us"], 1),
                "gemv",
                row.get("gemv"),
                "best",
                row.get("best"),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
