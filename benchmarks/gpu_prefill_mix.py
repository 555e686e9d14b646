"""Prefill attention in steps shaped like the engine's (issue 14): why a call costs more there than alone.

On an H200 the engine's `_prefill_kernel` took ~870 us per call in 256 x 2048/128 (8,192-token steps, chunked
prefill, decoding sequences in the same step), and 845 us already in the first step (four whole prompts, no
decode rows); `benchmarks/gpu_attention.py` times the same 4 x 2048 tokens at 573 us. This times the attention
op (bf16, Llama-3.1-8B heads, block size 16, shuffled block tables: fxllm.backends.triton.selfcheck's case
builder) on steps built as fxllm's scheduler builds them (decodes first, then prefill chunks filling the
8,192-token budget), with and without the in-kernel RoPE, alone and right after a bf16 GEMM of the step's
gate/up shape (a hot, power-limited card, as in the engine), and reports the GPU time of each kernel; also with
the other key tiling (`page_tiles`, whole cache pages or not) and, with --sweep, every launch in both.

    python benchmarks/gpu_prefill_mix.py --out DIR [--cases pure_4x2048,mixed_d252] [--sweep]
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
from gpu_kernel_times import kernel_us_by, profile_cuda  # a sibling script (its folder is sys.path[0])

logger = logging.getLogger("fxllm.gpu.prefill_mix")

HQ, HKV, D, BUDGET = 32, 8, 128, 8192


def step_shape(decodes: int, chunked: bool) -> tuple[list[int], list[int]]:
    """(new tokens, context after the step) per sequence: `decodes` rows at 2,100 tokens of context first,
    then prompts of 2,048 filling the rest of the budget; `chunked`: the first prompt finishes a chunk (1,000
    tokens cached) and the last one starts one."""
    if not chunked:
        prompts = [2048] * ((BUDGET - decodes) // 2048)
        return [1] * decodes + prompts, [2100] * decodes + prompts
    last = BUDGET - decodes - 1048 - 3 * 2048
    return [1] * decodes + [1048, 2048, 2048, 2048, last], [2100] * decodes + [2048, 2048, 2048, 2048, last]


CASES: dict[str, tuple[int, bool]] = {  # name -> (decode rows, chunked prompts)
    "pure_4x2048": (0, False),
    "chunked": (0, True),
    "mixed_d64": (64, True),
    "mixed_d252": (252, True),
}


def prefill_flops(q_lens: list[int], ctx_lens: list[int]) -> float:
    """Causal attention flops of the prefill rows: 4 * Hq * D per (query, visible key)."""
    keys = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(q_lens, ctx_lens) if q > 1)
    return 4.0 * HQ * D * keys


def _kernel_us(fn: Any, calls: int = 5) -> dict[str, float]:
    """GPU microseconds per call of each kernel `fn` launches, from one profiled run of `calls` calls."""
    times = kernel_us_by(profile_cuda(fn, calls), lambda name: name[:48], per=calls)
    return {k: round(v, 1) for k, v in times.items()}


def run_case(name: str, sweep: bool) -> dict[str, Any]:
    """Check the op on one step against the reference, then time it plain, with RoPE and after a GEMM."""
    import triton.testing

    from fxllm.backends.triton import paged_attention as pa
    from fxllm.backends.triton.selfcheck import check_paged, make_paged_case

    decodes, chunked = CASES[name]
    q_lens, ctx_lens = step_shape(decodes, chunked)
    c = make_paged_case(q_lens, ctx_lens, HQ, HKV, D, dtype=torch.bfloat16, device="cuda", seed=len(q_lens))
    row: dict[str, Any] = {"q_lens_prefill": [q for q in q_lens if q > 1], "decode_rows": decodes}
    row["check"] = check_paged(c, name)  # the default launch against the float32 reference
    flip = {"page_tiles": not pa.PREFILL_PAGE_TILES}  # the other key tiling, at the default launch
    row["check_flipped_page_tiles"] = check_paged(c, name, **flip)
    tokens = c.q.shape[0]
    angles = torch.rand(tokens, D // 2, device="cuda") * 6.283
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(torch.bfloat16)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(torch.bfloat16)
    out = torch.empty_like(c.q)
    gate_up = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 28672, device="cuda", dtype=torch.bfloat16) * 0.01

    def op(rope: bool = False, **launch: Any) -> None:
        pa.paged_attention_out(
            c.q, c.k, c.v, c.k_cache, c.v_cache, c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc,
            c.scale, -1, 0.0, None, out, cos=cos if rope else None, sin=sin if rope else None, **launch,
        )  # fmt: skip

    def after_gemm() -> None:
        torch.mm(gate_up, w)
        op(rope=True)

    flops = prefill_flops(q_lens, ctx_lens)
    row["op_ms"] = triton.testing.do_bench(op, warmup=10, rep=60)
    row["op_rope_ms"] = triton.testing.do_bench(lambda: op(rope=True), warmup=10, rep=60)
    row["kernels_us"] = _kernel_us(lambda: op(rope=True))
    flipped = triton.testing.do_bench(lambda: op(rope=True, **flip), warmup=10, rep=60)
    row["op_rope_flipped_page_tiles_ms"] = flipped
    row["kernels_flipped_page_tiles_us"] = _kernel_us(lambda: op(rope=True, **flip))
    row["kernels_after_gemm_us"] = _kernel_us(after_gemm, calls=20)
    prefill_us = next((v for k, v in row["kernels_us"].items() if "_prefill_kernel" in k), None)
    row["prefill_kernel_tflops"] = flops / (prefill_us * 1e6) if prefill_us else None
    if sweep:
        grid = itertools.product((64, 128), (32, 64), (4, 8), (2, 3), (False, True))
        row["sweep_ms"] = {}
        for bm, bn, warps, stages, pages in grid:
            launch = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, page_tiles=pages)
            try:
                ms = triton.testing.do_bench(lambda kw=launch: op(rope=True, **kw), warmup=5, rep=30)
            except Exception as exc:  # a tile that does not fit in shared memory: record it
                ms = f"{type(exc).__name__}: {str(exc)[:120]}"
            row["sweep_ms"][f"{bm}x{bn}x{warps}w{stages}s" + ("_pages" if pages else "")] = ms
        # 8-warp 128 x 64 launches capped to 128 registers (2 programs an SM where shared memory allows: 2 stages;
        # sm_90a: 116-136 bytes spilled, key loop 449-464 instructions per tile against 406 uncapped at 180).
        for stages in (2, 3):
            launch = dict(block_m=128, block_n=64, num_warps=8, num_stages=stages, max_registers=128)
            ms = triton.testing.do_bench(lambda kw=launch: op(rope=True, **kw), warmup=5, rep=30)
            row["sweep_ms"][f"128x64x8w{stages}s_pages_r128"] = ms
    logger.info("%s: op %.3f ms, with RoPE %.3f ms, kernels %s, after a GEMM %s", name, row["op_ms"],
                row["op_rope_ms"], row["kernels_us"], row["kernels_after_gemm_us"])  # fmt: skip
    return row


def main() -> int:
    """Run the chosen cases; write prefill_mix.json under --out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sweep", action="store_true", help="also time prefill launch configurations")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in args.cases.split(","):
        try:
            results[name] = run_case(name, args.sweep and name in ("pure_4x2048", "mixed_d252"))
        except Exception as exc:  # one failing case must not cost the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            logger.exception("case %s failed", name)
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill_mix.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
