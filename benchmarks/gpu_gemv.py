"""Decode-sized GEMMs on the GPU: fxllm's Triton GEMV against cuBLAS (F.linear), Llama-3.1-8B shapes.

For M in 1, 2, 4, 8, 16 rows and each projection (weights [N, K], bf16): time per call inside a CUDA
graph (no launch overhead: `do_bench_cudagraph`), the weight bytes over that time in TB/s, and a check
against F.linear. With --sweep, a grid of launch sizes at M = 1 and 8 (--quick-sweep: a smaller grid).
`--tp N` takes one rank's shapes under tensor parallelism (qkv, gate_up and the LM head split by output
features, o and down by input features); `--shapes` and `--rows` pick cases.

    python benchmarks/gpu_gemv.py --out DIR [--sweep | --quick-sweep] [--tp 2] [--shapes qkv,o] [--rows 1,8]
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


COLUMN_PARALLEL = ("qkv", "gate_up", "lm_head")  # split by output features under TP; o and down by input


def shapes_for(tp: int, names: list[str] | None) -> dict[str, tuple[int, int]]:
    """One rank's [N, K] per projection at tensor-parallel size `tp`."""
    picked = {name: SHAPES[name] for name in names} if names else dict(SHAPES)
    return {
        name: (n // tp, k) if name in COLUMN_PARALLEL else (n, k // tp) for name, (n, k) in picked.items()
    }


def run(sweep: str, shapes: dict[str, tuple[int, int]], rows_list: tuple[int, ...] = ROWS) -> dict[str, Any]:
    """Time F.linear and the GEMV (default launch, optionally a sweep) for every shape and row count."""
    from fxllm.backends.triton import gemv

    configs: list[dict[str, int]] = [{}]
    grid = {
        "full": ((16, 32, 64), (256, 512, 1024), (4, 8), (3, 4, 5)),
        "quick": ((8, 16, 32), (256, 512), (4,), (3, 4)),
    }
    if sweep:
        configs += [
            {"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": s}
            for bn, bk, w, s in itertools.product(*grid[sweep])
        ]
    results: dict[str, Any] = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        gbytes = n * k * 2 / 1e9
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            row: dict[str, Any] = {}
            cublas = _us(lambda x=x, w=w: F.linear(x, w))
            row["cublas_us"], row["cublas_tbs"] = cublas, gbytes / cublas * 1e3  # GB per us -> TB/s
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
                row[label] = {"us": us, "tbs": gbytes / us * 1e3, "vs_cublas": cublas / us}
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
    parser.add_argument("--quick-sweep", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default=None, help="comma-separated row counts (default 1,2,4,8,16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sweep = "full" if args.sweep else "quick" if args.quick_sweep else ""
    shapes = shapes_for(args.tp, args.shapes.split(",") if args.shapes else None)
    rows = tuple(int(r) for r in args.rows.split(",")) if args.rows else ROWS
    results = {
        "device": torch.cuda.get_device_name(0),
        "tp": args.tp,
        "shapes": shapes,
        **run(sweep, shapes, rows),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemv.json").write_text(json.dumps(results, indent=1))
    for case, row in results.items():
        if isinstance(row, dict) and "cublas_us" in row:
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
