"""The decode kernel's alternative key loops (issue 15: SWAP_AB, WIDE, FP8_DOT) vs the reference, in Triton's interpreter.

Every case has GQA group 4 (8 query heads over 2 KV heads), a partial last key tile, split-KV with an empty
split (a 9-token sequence in 2 splits of 32-key tiles), and the launch's outputs NaN-poisoned first. The
reference is float32 math over the same (dequantized) cache. Tolerances on ||out - ref|| / ||ref||:
- SWAP_AB does the default loop's arithmetic in another order: float32 1e-5 (IEEE dots, summation order
  only), bfloat16 1e-2 (q, the tiles and P in bf16 as the default loop: measured ~2e-3). WIDE (swap_ab_wide)
  is SWAP_AB over renumbered head dims, the same math: the same bounds. Head dim 32 renumbers K and q only
  (V^T's rows need BLOCK_DV >= 64), so WIDE also runs at head dims 64 and 128 (one and two 64-row wgmmas).
  Its point, wide shared-memory reads of the e4m3 tiles, is checked on the sm_90 PTX (test_wide_ptx).
- FP8_DOT rounds q (per row, scale amax / 448) and P (times 256) to e4m3, 3 mantissa bits: each rounding is
  up to 2^-4 relative, ~0.03 rms. The output's error is about that rms (independent roundings across the
  keys and head dims average in the sum, as does the output itself): measured 0.024-0.030 here, so 5e-2.
  FlashAttention-3's FP8 forward makes the same two roundings (its paper reports 2.4e-2 RMSE for plain
  per-tensor FP8 on its test distribution). A broken variant (a lost scale, a wrong transpose, an unmasked
  tail or NaN slot) is off by O(1) or NaN.
"""

from __future__ import annotations

import re

import pytest
import torch

# First: on a CPU it switches Triton's interpreter on before anything below imports triton.
from triton_interpreted import record_launches
from triton_paged_attention import DEVICE, paged_attention

# isort: split
import hopper_ptx
import triton
import triton.language as tl

from fxllm.backends.triton import paged_attention_decode_loops as loops
from fxllm.backends.triton.selfcheck import PagedCase, make_paged_case, rel_err
from fxllm.ops.kv_quant import quantize_kv
from fxllm.ops.paged_attention import paged_attention_reference

VARIANTS = {
    "swap_ab": {"swap_ab": True},
    "swap_ab_wide": {"wide": True},
    "fp8_dot": {"fp8_dot": True},
    "fp8_dot+swap_ab": {"fp8_dot": True, "swap_ab": True},
}
# name -> (q_lens, ctx_lens, make_paged_case options, launch). The decode cases pass 32-key tiles (the e4m3
# dot's K must be >= 32 on a GPU) and 2 or 3 splits; "mixed" is a prefill step whose one-token sequences go
# to the decode kernel (MIXED) with the launch code's own tiles and splits.
CASES = {
    "decode split-KV": ([1, 1, 1], [20, 9, 70], {}, {"num_splits": 2, "block_n": 32}),
    "decode window softcap": ([1, 1, 1], [20, 9, 70], {"sliding_window": 24, "softcap": 5.0},
                              {"num_splits": 3, "block_n": 32}),
    "decode one split": ([1, 1, 1], [20, 9, 70], {}, {"num_splits": 1, "block_n": 32}),  # DIRECT: no combine
    "mixed": ([1, 5, 1], [20, 9, 70], {}, {}),
}  # fmt: skip
# cache name -> (q dtype, tolerance for SWAP_AB alone); FP8_DOT's tolerance is FP8_TOL.
CACHES = {"f32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 1e-2), "fp8": (torch.bfloat16, 1e-2)}
FP8_TOL = 5e-2
K_SCALE, V_SCALE = [0.5, 1.5], [2.0, 0.25]  # per KV head: the scales must reach the right head


# The decode kernel as an 8B decode step launches it over an FP8 cache (head dim 128, block 16, WRITE_KV), compiled for
# sm_90 with 4 warps: swap_ab, and swap_ab_wide (the loop benchmarks/fp8_decode_ptx.py counts in detail). A
# large batch launches it with DIRECT (one split), which changes only the epilogue (its bf16 output store goes
# through ldmatrix): the checks below are about the key loop, so the PTX is of the partials' epilogue.
_PTX_CONSTS = dict(HEAD_DIM=128, HEAD_DIM_V=128, BLOCK_H=16, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128,
                   USE_SOFTCAP=False, USE_WINDOW=False, F32_DOT=False, KV_FP8=True, ROPE=False, WRITE_KV=True,
                   USE_PDL=False, FP8_F16=True, MIXED=False, SWAP_AB=True, FP8_DOT=False, DIRECT=False,
                   HAS_SINKS=False, PAGE_ROWS=16, PREFETCH_TILES=0)  # fmt: skip
_PTX_PTRS = {"kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv", "bt_ptr": "*i32", "lens_ptr": "*i32", "qsl_ptr": "*i32",
             "part_ptr": "*fp32", "lse_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "slot_ptr": "*i64"}  # fmt: skip
# Cache strides and pointers are multiples of 16 in the real launch (Triton specialises on it: vector loads).
_PTX_ALIGNED = ("skc_b", "skc_s", "skc_h", "svc_b", "svc_s", "svc_h", "sq_t", "sq_h", "sk_t", "sv_t", "sbt")
_PTX_NAMES = paged_attention._decode_kernel.arg_names
for _name, _extra in {"decode_swap_ab": {"WIDE": False}, "decode_swap_ab_wide": {"WIDE": True},
                      "decode_swap_ab_wide_prefetch": {"WIDE": True, "PREFETCH_TILES": 2}}.items():  # fmt: skip
    _consts = {**_PTX_CONSTS, **_extra}
    hopper_ptx.register(
        _name, "fxllm.backends.triton.paged_attention_decode", "_decode_kernel",
        {n: "constexpr" if n in _consts else _PTX_PTRS.get(n, "*bf16" if n.endswith("_ptr") else
         "fp32" if n in ("qk_scale", "softcap") else "i32") for n in _PTX_NAMES},
        _consts, tuple(i for i, n in enumerate(_PTX_NAMES) if n.endswith("_ptr") or n in _PTX_ALIGNED),
    )  # fmt: skip


@triton.jit
def _apply_perms(x_ptr, m_ptr, k_out, m_out, back_out):
    """WIDE's renumberings of a [16, 128] and a [128, 16] tile, and _unperm_m of the second."""
    r16 = tl.arange(0, 16)
    r128 = tl.arange(0, 128)
    xo = r16[:, None] * 128 + r128[None, :]
    tl.store(k_out + xo, loops._perm_k(tl.load(x_ptr + xo), 16, 128))
    mo = r128[:, None] * 16 + r16[None, :]
    pm = loops._perm_m(tl.load(m_ptr + mo), 128, 16)
    tl.store(m_out + mo, pm)
    tl.store(back_out + mo, loops._unperm_m(pm, 128, 16))


def _run(c: PagedCase, cache: str, launch: dict, flags: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kernel's output, the float32 reference) for the real tokens of case `c` over `cache`."""
    meta = (
        c.slot_mapping,
        c.block_tables,
        c.seq_lens,
        c.query_start_loc,
        c.scale,
        c.sliding_window,
        c.softcap,
    )
    scales: dict = {}
    if cache == "fp8":
        ks, vs = (torch.tensor(s, device=DEVICE) for s in (K_SCALE, V_SCALE))
        k_ref, v_ref = quantize_kv(c.k_cache_ref, ks), quantize_kv(c.v_cache_ref, vs)
        k_run, v_run = k_ref.clone(), v_ref.clone()
        scales = {"k_scale": ks, "v_scale": vs}
    else:
        k_ref, v_ref = c.k_cache_ref.clone(), c.v_cache_ref.clone()
        k_run, v_run = c.k_cache, c.v_cache  # NaN outside the context: a stray read shows
    ref = paged_attention_reference(c.q.float(), c.k.float(), c.v.float(), k_ref, v_ref, *meta, None,
                                    scales.get("k_scale"), scales.get("v_scale"))  # fmt: skip
    out = torch.full_like(c.q, float("nan"))
    paged_attention.paged_attention_out(
        c.q, c.k, c.v, k_run, v_run, *meta, None, out, **launch, **scales, **flags
    )
    n = c.num_real
    return out[:n].float(), ref[:n].float()


# FP8 dots need an FP8 cache (test_fp8_dot_needs_fp8_cache).
PARAMS = [(v, cache, case) for v in VARIANTS for cache in CACHES for case in CASES
          if cache == "fp8" or not VARIANTS[v].get("fp8_dot")]  # fmt: skip


@pytest.mark.parametrize(("variant", "cache", "case"), PARAMS)
def test_decode_variant_matches_reference(variant: str, cache: str, case: str, head_dim: int = 32) -> None:
    flags = VARIANTS[variant]
    q_lens, ctx_lens, options, launch = CASES[case]
    dtype, tol = CACHES[cache]
    c = make_paged_case(
        q_lens, ctx_lens, 8, 2, head_dim, block_size=8, dtype=dtype, device=DEVICE, seed=3, **options
    )
    out, ref = _run(c, cache, launch, flags)
    err = rel_err(out, ref)
    assert err <= (FP8_TOL if flags.get("fp8_dot") else tol), err


@pytest.mark.parametrize("cache", ["f32", "fp8"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_wide_matches_reference_at_wide_heads(cache: str, head_dim: int) -> None:
    """WIDE with V^T's rows renumbered too (BLOCK_DV >= 64), float32 (1e-5: a lost or wrong renumbering is
    O(1)) and FP8 caches."""
    test_decode_variant_matches_reference("swap_ab_wide", cache, "decode window softcap", head_dim)


def test_wide_renumbering_is_a_permutation_and_its_inverse() -> None:
    """The helpers move every element exactly once, as their docstrings say, and _unperm_m undoes _perm_m."""
    x = torch.arange(16 * 128, dtype=torch.int32, device=DEVICE).reshape(16, 128)
    m = torch.arange(128 * 16, dtype=torch.int32, device=DEVICE).reshape(128, 16)
    got_k, got_m, back = (torch.empty_like(t) for t in (x, m, m))
    _apply_perms[(1,)](x, m, got_k, got_m, back)
    j = torch.arange(128)
    kb, h, c, e = j // 16, (j // 8) % 2, (j // 2) % 4, j % 2
    assert torch.equal(got_k.cpu(), x.cpu()[:, c * 32 + kb * 4 + h * 2 + e])
    rep, w, h, r = j // 64, (j // 16) % 4, (j // 8) % 2, j % 8
    assert torch.equal(got_m.cpu(), m.cpu()[w * 32 + r * 4 + rep * 2 + h])
    assert torch.equal(back.cpu(), m.cpu())


def test_fp8_dot_quantizes() -> None:
    """With a float32 q the default loop over an FP8 cache is exact to 1e-5; FP8_DOT is not: the flag reaches
    the kernel (else the tolerance test above would pass on the default loop) and its error stays bounded."""
    q_lens, ctx_lens, _, launch = CASES["decode split-KV"]
    c = make_paged_case(q_lens, ctx_lens, 8, 2, 32, block_size=8, dtype=torch.float32, device=DEVICE, seed=3)
    exact = rel_err(*_run(c, "fp8", launch, {}))
    swapped = rel_err(*_run(c, "fp8", launch, {"swap_ab": True}))
    quantized = rel_err(*_run(c, "fp8", launch, {"fp8_dot": True, "swap_ab": True}))
    assert exact <= 1e-5 and swapped <= 1e-5, (exact, swapped)
    assert 1e-3 < quantized <= FP8_TOL, quantized


def test_fp8_dot_needs_fp8_cache() -> None:
    c = make_paged_case([1], [9], 8, 2, 32, block_size=8, dtype=torch.bfloat16, device=DEVICE)
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale, -1, 0.0, None)
    with pytest.raises(ValueError, match="fp8_dot needs an FP8 KV cache"):
        paged_attention.paged_attention_out(
            c.q, c.k, c.v, c.k_cache, c.v_cache, *meta, c.q.clone(), fp8_dot=True
        )


def test_decode_loop_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch code's rule: swap-AB with WIDE over FP8 caches, the default loop over others (the H200 sweeps'
    winners); a table choice runs only where its shape conditions hold. The swap-AB loops prefetch their first
    2 key tiles into L2 (PREFETCH_TILES), the default loop none."""
    from fxllm.backends.triton import paged_attention_decode_choice as choice

    assert choice.choose_decode_loop(True, 128) == (True, False, 64, 4, 5, True, 2)
    assert choice.choose_decode_loop(False, 128) == (False, False, 64, 8, 2, False, 0)
    # The caller's flags and knobs win; the rest of the launch is the asked loop's own (swap-AB: 2 stages).
    loop = choice.choose_decode_loop(False, 128, swap_ab=True, block_n=32)
    assert loop == (True, False, 32, 4, 2, False, 2)
    # wide implies the swap; FP8 dots have no WIDE form.
    assert choice.choose_decode_loop(True, 128, wide=True) == (True, False, 64, 4, 5, True, 2)
    assert choice.choose_decode_loop(True, 128, fp8_dot=True, wide=True) == (False, True, 64, 8, 2, False, 0)
    monkeypatch.setattr(choice, "SKIPPED", {})
    monkeypatch.setitem(choice.DECODE_LOOPS, "fp8", "fp8_dot")
    monkeypatch.setitem(choice.DECODE_LOOPS, "other", "fp8_dot")
    monkeypatch.setitem(choice.LAUNCH, "fp8_dot", (128, 8, 2))
    assert choice.choose_decode_loop(True, 128) == (True, True, 128, 8, 2, False, 2)  # the loop's own launch
    assert choice.choose_decode_loop(True, 128, num_stages=4) == (True, True, 128, 8, 4, False, 2)
    assert choice.choose_decode_loop(True, 128, block_n=32) == (False, False, 32, 8, 2, False, 0)  # wgmma's M
    assert choice.choose_decode_loop(True, 16) == (False, False, 64, 8, 2, False, 0)  # the e4m3 dot's K
    assert choice.choose_decode_loop(False, 128) == (False, False, 64, 8, 2, False, 0)  # no FP8 data to dot
    assert sorted(reason for _, _, reason in choice.SKIPPED) == [
        "BLOCK_N 32 < 64 (wgmma's M)", "head dim 16 < 32 (the e4m3 dot's K)", "no FP8 cache",
    ]  # fmt: skip


def test_rule_and_op_backend_reach_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """DECODE_LOOPS and the triton_fp8_dot op backend's knobs both switch the kernel to FP8 dots (float32 q: the
    default loop would be exact to 1e-5)."""
    from fxllm.backends.triton import paged_attention_decode_choice as choice

    c = make_paged_case([1, 1], [20, 70], 8, 2, 32, block_size=8, dtype=torch.float32, device=DEVICE, seed=3)
    monkeypatch.setitem(choice.DECODE_LOOPS, "fp8", "fp8_dot")
    by_rule = rel_err(*_run(c, "fp8", {"num_splits": 2}, {}))
    monkeypatch.setitem(choice.DECODE_LOOPS, "fp8", "default")
    ks, vs = (torch.tensor(s, device=DEVICE) for s in (K_SCALE, V_SCALE))
    k8, v8 = quantize_kv(c.k_cache_ref, ks), quantize_kv(c.v_cache_ref, vs)
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    ref = paged_attention_reference(c.q, c.k, c.v, k8.clone(), v8.clone(), *meta, -1, 0.0, None, ks, vs)
    knobs = paged_attention.VARIANTS["triton_fp8_dot"]
    out = paged_attention.paged_attention(c.q, c.k, c.v, k8, v8, *meta, k_scale=ks, v_scale=vs, **knobs)
    by_backend = rel_err(out[: c.num_real], ref[: c.num_real])
    assert 1e-3 < by_rule <= FP8_TOL and 1e-3 < by_backend <= FP8_TOL, (by_rule, by_backend)


def test_wide_op_backend_reaches_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The triton_swap_ab_wide op backend's knobs launch the decode kernel with SWAP_AB and WIDE (the
    reference tests above cannot tell: WIDE computes what SWAP_AB computes)."""
    launched = record_launches(monkeypatch, paged_attention, "_decode_kernel")
    c = make_paged_case([1, 1], [20, 70], 8, 2, 64, block_size=8, dtype=torch.bfloat16, device=DEVICE, seed=3)
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    ref = paged_attention_reference(c.q, c.k, c.v, c.k_cache_ref.clone(), c.v_cache_ref.clone(), *meta, -1,
                                    0.0, None)  # fmt: skip
    knobs = paged_attention.VARIANTS["triton_swap_ab_wide"]
    out = paged_attention.paged_attention(c.q, c.k, c.v, c.k_cache, c.v_cache, *meta, **knobs)
    assert [(kw["SWAP_AB"], kw["WIDE"], kw["FP8_DOT"]) for kw in launched] == [(True, True, False)]
    assert rel_err(out[: c.num_real].float(), ref[: c.num_real].float()) <= 1e-2


def test_wide_ptx() -> None:
    """Compiled for sm_90 the WIDE loop reads the e4m3 tiles from shared memory in 16-byte (K) and 4-byte (V^T)
    loads, converts them with packed cvt, and has no f16 round trip through shared memory (no ldmatrix); the
    plain swap-AB loop reads them byte by byte, so the same check fails there."""
    plain, wide = hopper_ptx.ptx("decode_swap_ab"), hopper_ptx.ptx("decode_swap_ab_wide")
    narrow = ("ld.shared.b8", "ld.shared.b16", "ld.shared.v2.b8", "ld.shared.v4.b8", "ld.shared.u8")
    assert any(op in plain for op in narrow)
    assert not [op for op in narrow if op in wide]
    assert "ld.shared.v4.b32" in wide and "cvt.rn.f16x2.e4m3x2" in wide and "ldmatrix" not in wide
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16" in wide


def _prologue(ptx: str) -> str:
    """The kernel's PTX up to its first barrier (the KV write's, before the key loop)."""
    return ptx[ptx.index(".entry") : ptx.index("bar.sync")]


def test_decode_prologue_ptx() -> None:
    """The decode prologue issues all its loads (length, q, this step's k/v, slot, scales) before any branch on
    a loaded value and before the KV write's stores: a branch or a store between two loads puts a DRAM round
    trip between them (the A/B is in benchmarks/RESULTS.md, seventeenth session). With PREFETCH_TILES the
    first tiles' K/V rows are prefetched into L2 (one line each of K and V per thread at 2 x 64 keys, 4 warps),
    after every load and before the barrier."""
    for name in ("decode_swap_ab_wide", "decode_swap_ab_wide_prefetch"):
        head = _prologue(hopper_ptx.ptx(name))
        first_branch = re.search(r"@%p\d+ bra", head)
        first_store = head.index("st.global")
        loads = [m.start() for m in re.finditer(r"ld\.global", head)]
        # qsl, lens, 2 q rows (+ partner loads without RoPE: none), slot, k and v of the new token, k/v scales
        assert len(loads) >= 8, name
        assert first_branch is None or loads[-1] < first_branch.start(), name
        assert loads[-1] < first_store, name
    plain = _prologue(hopper_ptx.ptx("decode_swap_ab_wide"))
    fetched = _prologue(hopper_ptx.ptx("decode_swap_ab_wide_prefetch"))
    assert "prefetch" not in plain
    prefetches = [m.start() for m in re.finditer(r"prefetch\.global\.L2", fetched)]
    assert len(prefetches) == 2
    assert max(m.start() for m in re.finditer(r"ld\.global", fetched)) < prefetches[0]
