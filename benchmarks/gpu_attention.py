"""Prefill attention on the GPU: fxllm's Triton paged kernel against PyTorch SDPA's flash backend.

Issue 14's shapes (Llama-3.1-8B heads: 32 query heads, 8 KV heads, head dim 128; bf16; causal):
4 x 2048 and 1 x 8192 tokens, the paged cache with block size 16 in fxllm's case. Every launch
configuration in the sweep is checked against SDPA's output before it is timed. Optionally also times
another version of the kernel module (`--baseline path/to/paged_attention.py`) for a before/after, and
other cache block sizes (`--block-sizes 16,64`: rows a page holds; with whole-page key tiles a 64-row page is
one page entry a tile and contiguous rows).

    python benchmarks/gpu_attention.py --out DIR [--baseline FILE] [--sweep] [--block-sizes 16,32,64]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger("fxllm.gpu.attention")

HQ, HKV, D = 32, 8, 128
SHAPES = [(4, 2048), (1, 8192)]


def _time_ms(fn: Any) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60))


def _flops(batch: int, length: int) -> float:
    # Two matmuls of 2 * L * L * D flops per head and sequence; causal halves them.
    return 2 * 2 * batch * HQ * length * length * D / 2


def _case(batch: int, length: int, block_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(batch * 100003 + length)
    tokens = batch * length
    dt = torch.bfloat16
    q = torch.randn(tokens, HQ, D, device="cuda", dtype=dt, generator=gen)
    k = torch.randn(tokens, HKV, D, device="cuda", dtype=dt, generator=gen)
    v = torch.randn(tokens, HKV, D, device="cuda", dtype=dt, generator=gen)
    blocks_per_seq = length // block_size
    num_blocks = batch * blocks_per_seq + 7
    # A shuffled block table, as a long-running pool hands out blocks.
    perm = torch.randperm(num_blocks - 7, device="cuda", generator=gen).to(torch.int32) + 7
    block_tables = perm.view(batch, blocks_per_seq)
    pos = torch.arange(length, device="cuda")
    slots = (block_tables.long()[:, pos // block_size] * block_size + pos % block_size).flatten()
    return {
        "q": q, "k": k, "v": v, "slot_mapping": slots, "block_tables": block_tables,
        "seq_lens": torch.full((batch,), length, device="cuda", dtype=torch.int32),
        "query_start_loc": torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32),
        "k_cache": torch.zeros(num_blocks, block_size, HKV, D, device="cuda", dtype=dt),
        "v_cache": torch.zeros(num_blocks, block_size, HKV, D, device="cuda", dtype=dt),
    }  # fmt: skip


def _sdpa(c: dict[str, torch.Tensor], batch: int, length: int) -> tuple[torch.Tensor, Any]:
    q = c["q"].view(batch, length, HQ, D).transpose(1, 2)
    # Flash takes GQA only through enable_gqa on newer builds: expand K/V (its speed is the same).
    k = c["k"].view(batch, length, HKV, D).repeat_interleave(HQ // HKV, dim=2).transpose(1, 2)
    v = c["v"].view(batch, length, HKV, D).repeat_interleave(HQ // HKV, dim=2).transpose(1, 2)

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = run().transpose(1, 2).reshape(batch * length, HQ, D)
    return out, run


def _paged(module: ModuleType, c: dict[str, torch.Tensor], **launch: int) -> tuple[torch.Tensor, Any]:
    out = torch.empty_like(c["q"])

    def run() -> None:
        module.paged_attention_out(
            c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["slot_mapping"], c["block_tables"],
            c["seq_lens"], c["query_start_loc"], D**-0.5, -1, 0.0, None, out, **launch,
        )  # fmt: skip

    run()
    return out, run


def _load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_paged_attention", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(baseline: str | None, sweep: bool, block_sizes: tuple[int, ...] = (16,)) -> dict[str, Any]:
    """Time SDPA flash, the current kernel (default launch and a sweep) and an optional baseline; per shape and
    cache block size (results under "BxL", or "BxL block N" for a block size other than 16)."""
    from fxllm.backends.triton import paged_attention as current

    modules = {"current": current}
    if baseline:
        modules["baseline"] = _load_module(baseline)
    configs = [{}]
    if sweep:
        configs += [
            {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": s}
            for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
        ]
    results: dict[str, Any] = {}
    for (batch, length), block_size in itertools.product(SHAPES, block_sizes):
        c = _case(batch, length, block_size)
        ref, sdpa_run = _sdpa(c, batch, length)
        sdpa_ms = _time_ms(sdpa_run)
        tflops = _flops(batch, length) / 1e9
        shape = f"{batch}x{length}" + ("" if block_size == 16 else f" block {block_size}")
        row: dict[str, Any] = {"sdpa_flash_ms": sdpa_ms, "sdpa_flash_tflops": tflops / sdpa_ms}
        for name, module in modules.items():
            for launch in configs if name == "current" else [{}]:
                label = name + ("" if not launch else " " + ",".join(f"{k}={v}" for k, v in launch.items()))
                try:
                    out, fn = _paged(module, c, **launch)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not err < 2e-2:
                        row[label] = {"error": f"rel err {err:.3g} vs SDPA"}
                        continue
                    ms = _time_ms(fn)
                except Exception as exc:  # a launch config that does not fit (shared memory): record it
                    row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    continue
                row[label] = {"ms": ms, "tflops": tflops / ms, "vs_sdpa": sdpa_ms / ms, "rel_err": err}
        best = max(
            ((k, v) for k, v in row.items() if isinstance(v, dict) and "ms" in v),
            key=lambda kv: kv[1]["vs_sdpa"],
        )
        row["best"] = {"label": best[0], **best[1]}
        logger.info(
            "%s: SDPA flash %.3f ms; default %s; best %s", shape, sdpa_ms, row.get("current"), row["best"]
        )
        results[shape] = row
        del c
        torch.cuda.empty_cache()
    return results


def main() -> int:
    """Parse arguments, run, write attention.json under --out, print the summary."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--baseline", default=None, help="another paged_attention.py to time as well")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    parser.add_argument("--block-sizes", default="16", help="comma-separated cache block sizes (rows a page)")
    args = parser.parse_args()
    block_sizes = tuple(int(b) for b in args.block_sizes.split(","))
    logging.basicConfig(level=logging.INFO)
    results = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        **run(args.baseline, args.sweep, block_sizes),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention.json").write_text(json.dumps(results, indent=1))
    for shape in (k for k in results if k not in ("device", "torch")):
        row = results[shape]
        print(shape, "sdpa", round(row["sdpa_flash_ms"], 3), "current", row.get("current"),
              "baseline", row.get("baseline"), "best", row["best"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
