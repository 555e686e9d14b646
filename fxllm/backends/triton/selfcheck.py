"""Correctness checks of the Triton kernels against the reference ops, at test or GPU scale.

`check_all(device, dtype)` runs every kernel on fresh random inputs (never zeros) with NaN-poisoned
outputs, compares with the fxllm reference op by ||out - ref|| / ||ref||, and returns one dict per
case. The bf16 reference runs on float32 upcasts of the same inputs, so the error is the kernel's.
Tolerances (why): float32 elementwise/norm math is the same sequence of float32 operations up to
reduction order and FMA contraction, ~1e-7, so 1e-5; float32 attention uses IEEE (not tf32) dots,
differing only in summation order and exp2, so 1e-5 as well; bf16 outputs carry a 2^-9 relative
rounding (attention also rounds P to bf16, as the reference does), ~3e-3, so 1e-2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fxllm.backends.triton import activations, norms, paged_attention, rotary
from fxllm.ops.norms import rms_norm_reference
from fxllm.ops.paged_attention import paged_attention_reference
from fxllm.ops.rotary import rotary_embedding_reference

logger = logging.getLogger(__name__)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN)."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _nan(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _result(
    op: str, case: str, dtype: torch.dtype, err: float, unwritten: int, extra_ok: bool = True
) -> dict:
    tol = TOL[dtype]
    ok = unwritten == 0 and extra_ok and math.isfinite(err) and err <= tol
    return {"op": op, "case": case, "dtype": str(dtype).removeprefix("torch."), "rel_err": err, "tol": tol,
            "unwritten": unwritten, "ok": ok}  # fmt: skip


def check_norms(device: str, dtype: torch.dtype, rows: int, hidden: int, seed: int = 0) -> list[dict]:
    """rms_norm and fused_add_rms_norm on a strided [rows, hidden] input."""
    gen = torch.Generator().manual_seed(seed)
    # x is a strided view (row stride 2 * hidden): exercises the in-kernel row stride.
    x = _randn((rows, 2 * hidden), dtype, device, gen)[:, :hidden]
    res = _randn((rows, hidden), dtype, device, gen)
    w = _randn((hidden,), dtype, device, gen)
    out = _nan((rows, hidden), dtype, device)
    norms.rms_norm_out(x, w, 1e-6, out)
    ref = rms_norm_reference(x.float(), w.float(), 1e-6)
    results = [_result("rms_norm", f"{rows}x{hidden}", dtype, rel_err(out, ref), int(out.isnan().sum()))]
    out, summed = _nan((rows, hidden), dtype, device), _nan((rows, hidden), dtype, device)
    norms.fused_add_rms_norm_out(x, res, w, 1e-6, out, summed)
    ref_sum = (x + res).float()  # the reference rounds the sum to x's dtype before normalising
    ref = rms_norm_reference(ref_sum, w.float(), 1e-6)
    bad = int(out.isnan().sum() + summed.isnan().sum())
    err = max(rel_err(out, ref), rel_err(summed, ref_sum))
    results.append(_result("fused_add_rms_norm", f"{rows}x{hidden}", dtype, err, bad))
    return results


def check_rotary(
    device: str, dtype: torch.dtype, batch: int, hq: int, hk: int, seq: int, dim: int, seed: int = 0
) -> dict:
    """RoPE on transposed (non-contiguous) q/k views with [B, 1, T, D] cos/sin."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn((batch, seq, hq, dim), dtype, device, gen).transpose(1, 2)  # HF layout: a view
    k = _randn((batch, seq, hk, dim), dtype, device, gen).transpose(1, 2)
    cos = _randn((batch, 1, seq, dim), dtype, device, gen)
    sin = _randn((batch, 1, seq, dim), dtype, device, gen)
    q_out = torch.full_like(q, float("nan"))
    k_out = _nan(tuple(k.shape), dtype, device)  # contiguous: a second output layout
    rotary.rotary_embedding_out(q, k, cos, sin, q_out, k_out)
    rq, rk = rotary_embedding_reference(q.float(), k.float(), cos.float(), sin.float())
    err = max(rel_err(q_out, rq), rel_err(k_out, rk))
    bad = int(q_out.isnan().sum() + k_out.isnan().sum())
    return _result("rotary_embedding", f"B{batch} Hq{hq} Hk{hk} T{seq} D{dim}", dtype, err, bad)


def check_gated(device: str, dtype: torch.dtype, rows: int, inter: int, act: str, seed: int = 0) -> dict:
    """silu/gelu-and-mul on the two halves of one merged [rows, 2I] tensor (row stride 2I)."""
    gen = torch.Generator().manual_seed(seed)
    merged = _randn((rows, 2 * inter), dtype, device, gen) * 2
    gate, up = merged[:, :inter], merged[:, inter:]
    out = _nan((rows, inter), dtype, device)
    activations.gated_activation_out(gate, up, out, act)
    g, u = gate.float(), up.float()
    ref = F.silu(g) * u if act == "silu" else F.gelu(g, approximate=act) * u
    name = "silu_and_mul" if act == "silu" else f"gelu_and_mul[{act}]"
    return _result(name, f"{rows}x{inter}", dtype, rel_err(out, ref), int(out.isnan().sum()))


@dataclass
class PagedCase:
    """Inputs of one paged_attention call plus what the check needs to judge it."""

    q: Tensor
    k: Tensor
    v: Tensor
    k_cache: Tensor  # NaN in every slot that holds no context (unused blocks, tails, this step's slots)
    v_cache: Tensor
    k_cache_ref: Tensor  # the same context, finite everywhere
    v_cache_ref: Tensor
    slot_mapping: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    scale: float
    sliding_window: int
    softcap: float
    sinks: Tensor | None
    num_real: int  # tokens before query_start_loc[-1]
    context_slots: Tensor  # flat cache slots that hold context after the step


def make_paged_case(
    q_lens: list[int], ctx_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, *,
    block_size: int = 16, pad_tokens: int = 0, pad_seqs: int = 0, sliding_window: int = -1,
    softcap: float = 0.0, sinks: bool = False, dtype: torch.dtype = torch.float32, device: str = "cpu",
    seed: int = 0,
) -> PagedCase:  # fmt: skip
    """Random paged batch; block tables are a random permutation of the pool (non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = [-(-c // block_size) for c in ctx_lens]
    pool = sum(nblocks) + 2  # two spare blocks stay NaN: reading them would show
    perm = torch.randperm(pool, generator=gen)
    tables = torch.full((len(q_lens) + pad_seqs, max(nblocks) + 1), int(perm[-1]), dtype=torch.int32)
    slots, new_slots, used = [], [], 0
    for s, (ql, cl) in enumerate(zip(q_lens, ctx_lens)):
        tables[s, : nblocks[s]] = perm[used : used + nblocks[s]]
        used += nblocks[s]
        seq_slots = [int(tables[s, p // block_size]) * block_size + p % block_size for p in range(cl)]
        slots += seq_slots
        new_slots += seq_slots[cl - ql :]
    shape = (pool, block_size, num_kv_heads, head_dim)
    k_ref, v_ref = _randn(shape, dtype, device, gen), _randn(shape, dtype, device, gen)
    context = torch.tensor(slots, dtype=torch.long, device=device)
    stale = torch.ones(pool * block_size, dtype=torch.bool, device=device)
    stale[context] = False
    stale[torch.tensor(new_slots, dtype=torch.long, device=device)] = True  # the op must write these
    k_cache, v_cache = k_ref.clone(), v_ref.clone()
    k_cache.view(-1, num_kv_heads, head_dim)[stale] = float("nan")
    v_cache.view(-1, num_kv_heads, head_dim)[stale] = float("nan")
    num_real = sum(q_lens)
    tokens = num_real + pad_tokens
    slot_mapping = torch.tensor(new_slots + [-1] * pad_tokens, dtype=torch.int64, device=device)
    qsl = torch.tensor(
        [0, *torch.tensor(q_lens).cumsum(0).tolist()] + [num_real] * pad_seqs, dtype=torch.int32
    )
    return PagedCase(
        q=_randn((tokens, num_heads, head_dim), dtype, device, gen),
        k=_randn((tokens, num_kv_heads, head_dim), dtype, device, gen),
        v=_randn((tokens, num_kv_heads, head_dim), dtype, device, gen),
        k_cache=k_cache, v_cache=v_cache, k_cache_ref=k_ref, v_cache_ref=v_ref,
        slot_mapping=slot_mapping, block_tables=tables.to(device),
        seq_lens=torch.tensor(ctx_lens + [0] * pad_seqs, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(device), scale=head_dim**-0.5, sliding_window=sliding_window,
        softcap=softcap, sinks=_randn((num_heads,), torch.float32, device, gen) if sinks else None,
        num_real=num_real, context_slots=context,
    )  # fmt: skip


def check_paged(c: PagedCase, name: str, **launch: int) -> dict:
    """Run the Triton op on `c` (launch overrides block sizes / splits) and compare with the reference."""
    dtype = c.q.dtype
    out = _nan((*c.q.shape[:-1], c.v.shape[-1]), dtype, str(c.q.device))
    paged_attention.paged_attention_out(
        c.q, c.k, c.v, c.k_cache, c.v_cache, c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc,
        c.scale, c.sliding_window, c.softcap, c.sinks, out, **launch,
    )  # fmt: skip
    kr, vr = c.k_cache_ref.float(), c.v_cache_ref.float()
    ref = paged_attention_reference(
        c.q.float(), c.k.float(), c.v.float(), kr, vr, c.slot_mapping, c.block_tables, c.seq_lens,
        c.query_start_loc, c.scale, c.sliding_window, c.softcap, c.sinks,
    )  # fmt: skip
    n = c.num_real
    flat = c.context_slots
    cache_ok = bool(
        torch.equal(c.k_cache.flatten(0, 1)[flat].float(), kr.flatten(0, 1)[flat])
        and torch.equal(c.v_cache.flatten(0, 1)[flat].float(), vr.flatten(0, 1)[flat])
    )
    padding_ok = bool((out[n:] == 0).all())
    err = rel_err(out[:n], ref[:n])
    result = _result("paged_attention", name, dtype, err, int(out.isnan().sum()), cache_ok and padding_ok)
    result.update(cache_ok=cache_ok, padding_ok=padding_ok)
    return result


def paged_cases(small: bool, dtype: torch.dtype, device: str) -> dict[str, PagedCase]:
    """Named paged-attention cases: small for the interpreter, Llama-3.1-8B heads for the GPU."""
    if small:
        hq, hkv, d = 8, 2, 32
        dec_ctx, pre_q, pre_ctx = [1, 37, 70], [5, 1, 20], [5, 40, 50]
    else:
        hq, hkv, d = 32, 8, 128
        dec_ctx = [1, 17, 300, 1000, 2048, 4000, 33, 129]
        pre_q, pre_ctx = [512, 1, 300, 37, 1], [512, 700, 1200, 37, 3000]
    kw = {"dtype": dtype, "device": device}
    mk = make_paged_case
    return {
        "decode gqa": mk([1] * len(dec_ctx), dec_ctx, hq, hkv, d, **kw),
        "decode mqa": mk([1] * len(dec_ctx), dec_ctx, hq // 2, 1, d, seed=1, **kw),
        "decode padded seq": mk(
            [1] * len(dec_ctx), dec_ctx, hq, hkv, d, pad_tokens=1, pad_seqs=1, seed=2, **kw
        ),
        "decode window+softcap+sinks": mk(
            [1] * len(dec_ctx), dec_ctx, hq, hkv, d, sliding_window=24, softcap=1.5, sinks=True, seed=3, **kw
        ),
        "prefill chunked gqa +pad": mk(pre_q, pre_ctx, hq, hkv, d, pad_tokens=3, seed=4, **kw),
        "prefill mqa": mk(pre_q, pre_ctx, hq // 2, 1, d, seed=5, **kw),
        "prefill window+softcap+sinks": mk(
            pre_q, pre_ctx, hq, hkv, d, pad_tokens=2, sliding_window=16, softcap=1.5, sinks=True, seed=6, **kw
        ),
    }


def _graph_check(c: PagedCase, name: str) -> dict:
    """Capture the op in a CUDA graph (which fails on any host sync), replay it, compare with eager."""
    args = (c.q, c.k, c.v, c.k_cache, c.v_cache, c.slot_mapping, c.block_tables, c.seq_lens,
            c.query_start_loc, c.scale, c.sliding_window, c.softcap, c.sinks)  # fmt: skip
    eager = paged_attention.paged_attention(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention.paged_attention(*args)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention.paged_attention(*args)
    graph.replay()
    torch.cuda.synchronize()
    err = rel_err(out[: c.num_real], eager[: c.num_real])
    return _result("paged_attention", f"{name} (cuda graph replay vs eager)", c.q.dtype, err, 0)


def check_all(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, small: bool = False) -> list[dict]:
    """Every Triton kernel vs its reference; GPU-scale Llama-3.1-8B shapes unless `small`."""
    if small:
        rows, hidden, inter, rope = 5, 96, 80, (2, 4, 2, 5, 32)
    else:
        rows, hidden, inter, rope = 256, 4096, 14336, (4, 32, 8, 128, 128)
    results = check_norms(device, dtype, rows, hidden)
    results.append(check_rotary(device, dtype, *rope))
    results += [check_gated(device, dtype, rows, inter, act) for act in ("silu", "none", "tanh")]
    cases = paged_cases(small, dtype, device)
    launch = {"block_m": 16, "block_n": 16, "num_splits": 3} if small else {}
    for name, case in cases.items():
        results.append(check_paged(case, name, **launch))
    if device.startswith("cuda"):
        for name in ("decode gqa", "prefill chunked gqa +pad"):
            results.append(_graph_check(paged_cases(small, dtype, device)[name], name))
    for r in results:
        logger.info("%-20s %-45s %-9s rel_err=%.2e tol=%.0e %s", r["op"], r["case"], r["dtype"], r["rel_err"],
                    r["tol"], "ok" if r["ok"] else "FAIL")  # fmt: skip
    return results
