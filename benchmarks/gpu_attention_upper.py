"""How fast could Triton prefill attention be on this GPU? An upper-bound probe for issue 14's 2,048/128 case.

fxllm's paged prefill kernel runs at ~1.0x SDPA flash (FA2) at 4 x 2,048 (benchmarks/RESULTS.md). Before
building a faster one into the op, this times what the easiest case allows: dense causal GQA attention over
contiguous K/V, Llama-3.1-8B heads, bf16, one program per (query block, query head) or per (query block,
KV head) with the group's query heads packed as rows (fxllm's layout), K/V tiles through pointer loads, Hopper
TMA tensor descriptors, or pointer loads through a shuffled page table (the paged cache's access). Beside
it: SDPA's flash and cuDNN backends and fxllm's paged attention op on the same data (the op also writes this
step's K/V into the cache, as it does in an engine; the probe only reads). Every variant is checked against SDPA
before it is timed.

    python benchmarks/gpu_attention_upper.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger("fxllm.gpu.attention_upper")

HQ, HKV, D = 32, 8, 128
SHAPES = [(4, 2048), (1, 8192)]


@triton.jit
def _kv_tile(k_ptr, v_ptr, k_desc, v_desc, bt_ptr, b, bt_stride, row0, start, kvh, offs_n, d,
             HKV: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr, PAGED: tl.constexpr):  # fmt: skip
    if TMA:
        k = k_desc.load([row0 + start, kvh * D])
        v = v_desc.load([row0 + start, kvh * D])
    else:
        pos = start + offs_n
        if PAGED:  # pages of 16 rows in a [num_blocks * 16, HKV * D] pool, as the paged cache
            row = tl.load(bt_ptr + b * bt_stride + pos // 16).to(tl.int64) * 16 + pos % 16
        else:
            row = (row0 + pos).to(tl.int64)
        rows = row[:, None] * (HKV * D) + kvh * D + d[None, :]
        k = tl.load(k_ptr + rows)
        v = tl.load(v_ptr + rows)
    return k, v


@triton.jit
def _dense_causal_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, k_desc, v_desc, bt_ptr, bt_stride, seq_len, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr, TMA: tl.constexpr, PACK: tl.constexpr, PAGED: tl.constexpr,
):  # fmt: skip
    # Last query blocks first (they see the most keys), as fxllm's kernel does.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    G: tl.constexpr = HQ // HKV
    if PACK:  # BLOCK_Q tokens x the G query heads of one KV head as rows, as fxllm's kernel
        bh = tl.program_id(1)
        b = bh // HKV
        kvh = bh % HKV
        r = tl.arange(0, ROWS)
        tok = q_block * BLOCK_Q + r // G
        head = kvh * G + r % G
    else:
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        kvh = h // G
        tok = q_block * BLOCK_Q + tl.arange(0, ROWS)
        head = h + tok * 0
    row0 = b * seq_len
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    q_off = (row0 + tok)[:, None].to(tl.int64) * (HQ * D) + head[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_off)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    # Keys before the block's first query are visible to every row: whole tiles there skip the mask.
    full_hi = q_block * BLOCK_Q // BLOCK_N * BLOCK_N
    for start in tl.range(0, full_hi, BLOCK_N):
        k, v = _kv_tile(k_ptr, v_ptr, k_desc, v_desc, bt_ptr, b, bt_stride, row0, start, kvh, offs_n, d,
                        HKV, D, TMA, PAGED)  # fmt: skip
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    for start in range(full_hi, (q_block + 1) * BLOCK_Q, BLOCK_N):  # the diagonal tiles, masked
        k, v = _kv_tile(k_ptr, v_ptr, k_desc, v_desc, bt_ptr, b, bt_stride, row0, start, kvh, offs_n, d,
                        HKV, D, False, PAGED)  # fmt: skip
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(tok[:, None] >= (start + offs_n)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_off, out.to(tl.bfloat16))


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, length: int, bq: int, bn: int,
           warps: int, stages: int, tma: bool, pack: bool, paged: bool) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """One launch of the probe kernel; `paged` reads K/V through a shuffled table of 16-row pages."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = torch.empty_like(q)
    k2, v2 = k.view(-1, HKV * D), v.view(-1, HKV * D)
    bt = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    if paged:
        pages = batch * length // 16
        bt = torch.randperm(pages, device=q.device).to(torch.int32).view(batch, length // 16)
        pos = torch.arange(length, device=q.device)
        slots = (bt.long()[:, pos // 16] * 16 + pos % 16).flatten()
        k2, v2 = torch.empty_like(k2), torch.empty_like(v2)
        k2[slots], v2[slots] = k.view(-1, HKV * D), v.view(-1, HKV * D)
    kd = TensorDescriptor.from_tensor(k2, [bn, D]) if tma else k2
    vd = TensorDescriptor.from_tensor(v2, [bn, D]) if tma else v2
    grid = (length // bq, batch * (HKV if pack else HQ))

    def run() -> None:
        _dense_causal_fwd[grid](
            q, k2, v2, out, kd, vd, bt, bt.stride(0), length, D**-0.5 * 1.4426950408889634, HQ=HQ, HKV=HKV,
            D=D, BLOCK_Q=bq, BLOCK_N=bn, ROWS=bq * (HQ // HKV if pack else 1), TMA=tma, PACK=pack, PAGED=paged,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    run()
    return out, run


def _time_ms(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60))


def _sdpa_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, length: int) -> dict[str, Any]:
    qt = q.view(batch, length, HQ, D).transpose(1, 2)
    kt = k.view(batch, length, HKV, D).repeat_interleave(HQ // HKV, dim=2).transpose(1, 2)
    vt = v.view(batch, length, HKV, D).repeat_interleave(HQ // HKV, dim=2).transpose(1, 2)
    runs = {}
    for name, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):

        def run(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        runs[name] = run
    kg, vg = k.view(batch, length, HKV, D).transpose(1, 2), v.view(batch, length, HKV, D).transpose(1, 2)

    def cudnn_gqa() -> torch.Tensor:  # the 8 KV heads as they are (no expansion), where cuDNN takes it
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kg, vg, is_causal=True, enable_gqa=True)

    runs["sdpa_cudnn_gqa"] = cudnn_gqa
    return runs


def _paged_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, length: int) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_attention import _case, _paged

    from fxllm.backends.triton import paged_attention

    c = _case(batch, length)
    c["q"], c["k"], c["v"] = q, k, v
    return _paged(paged_attention, c)


def run() -> dict[str, Any]:
    """Time every variant on each shape; the result rows carry ms, TFLOP/s and error vs SDPA flash."""
    results: dict[str, Any] = {}
    # (BLOCK_Q, BLOCK_N, warps, stages, pack); each as dense pointer loads, dense TMA, and paged pointer loads.
    launches = [(64, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False), (16, 64, 4, 3, True),
                (32, 32, 4, 3, True), (32, 64, 8, 3, True), (32, 64, 4, 3, True),
                (32, 128, 8, 3, True)]  # fmt: skip
    configs = [(*launch, tma, paged) for launch in launches for tma, paged in ((False, False), (True, False),
                                                                               (False, True))]  # fmt: skip
    for batch, length in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(length)
        q = torch.randn(batch * length, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(batch * length, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(batch * length, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        gflop = 2 * 2 * batch * HQ * length * length * D / 2 / 1e9
        sdpa = _sdpa_runs(q, k, v, batch, length)
        ref = sdpa["sdpa_flash"]().transpose(1, 2).reshape(q.shape).float()
        row: dict[str, Any] = {}

        def record(
            label: str,
            out: torch.Tensor,
            fn: Any,
            row: dict[str, Any] = row,
            ref: torch.Tensor = ref,
            gflop: float = gflop,
        ) -> None:
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                row[label] = {"error": f"rel err {err:.3g}"}
                return
            ms = _time_ms(fn)
            row[label] = {"ms": round(ms, 4), "tflops": round(gflop / ms, 1), "rel_err": err}

        for name, fn in sdpa.items():
            try:
                record(name, fn().transpose(1, 2).reshape(q.shape), fn)
            except Exception as exc:
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        try:
            out, fn = _paged_run(q, k, v, batch, length)
            record("fxllm_paged", out, fn)
        except Exception as exc:
            row["fxllm_paged"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        for bq, bn, warps, stages, pack, tma, paged in configs:
            label = f"{'paged' if paged else 'dense'} bq{bq} bn{bn} w{warps} s{stages}" + (
                " pack" if pack else ""
            )
            label += " tma" if tma else ""
            try:
                out, fn = _dense(q, k, v, batch, length, bq, bn, warps, stages, tma, pack, paged)
                record(label, out, fn)
            except Exception as exc:
                row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        timed = {k: v for k, v in row.items() if "ms" in v}
        best = min(timed, key=lambda k: timed[k]["ms"]) if timed else None
        logger.info("%dx%d: best %s %s", batch, length, best, timed.get(best or ""))
        results[f"{batch}x{length}"] = row
    return results


def main() -> int:
    """Parse arguments, run, write attention_upper.json under --out, print each shape's table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "triton": triton.__version__, **run()}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention_upper.json").write_text(json.dumps(results, indent=1))
    for shape in (f"{b}x{n}" for b, n in SHAPES):
        for label, r in sorted(results[shape].items(), key=lambda kv: kv[1].get("ms", 1e9)):
            print(shape, label, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
