"""The Triton paged-attention kernels over an FP8 KV cache vs the reference (Triton's interpreter on a CPU).

The kernels and the reference store the same e4m3 bytes (compared exactly) and attend over the same
dequantized values: float32 outputs agree to 1e-5 relative (summation order only), bfloat16 to 1e-2 (the
kernels round e4m3 -> bf16 exactly, fold k_scale into the score scale and multiply by v_scale at the end,
where the reference multiplies each element first: a few bf16 ulps).
"""

from __future__ import annotations

import pytest
import torch

# First: on a CPU it switches Triton's interpreter on before anything below imports triton.
from triton_paged_attention import DEVICE, paged_attention

# isort: split
from fxllm.backends.triton.paged_attention_prefill import prefill_launch
from fxllm.backends.triton.selfcheck import make_paged_case, rel_err
from fxllm.ops.kv_quant import FP8_KV_DTYPE, quantize_kv
from fxllm.ops.paged_attention import paged_attention_reference

SMALL_LAUNCH = {"num_splits": 3, "block_m": 16, "block_n": 16}
# The GPU's default prefill launch (head dim <= 128): query blocks ending mid-block, whole unmasked key tiles.
GPU_PREFILL_LAUNCH = prefill_launch(32, on_gpu=True)._asdict()
CASES = {
    "decode": ([1, 1, 1], [20, 9, 33], SMALL_LAUNCH),
    "prefill chunked": ([5, 9, 2], [20, 9, 33], SMALL_LAUNCH),
    "prefill, the GPU's launch": ([70, 1, 130], [90, 33, 190], GPU_PREFILL_LAUNCH),
}
SCALES = {
    "per tensor": ([0.5], [2.0]),
    "per head": ([0.5, 1.5], [2.0, 0.25]),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("case", list(CASES))
def test_triton_fp8_cache_matches_reference(case: str, scales: str, dtype: torch.dtype) -> None:
    q_lens, ctx_lens, launch = CASES[case]
    c = make_paged_case(q_lens, ctx_lens, 4, 2, 32, block_size=8, dtype=dtype, device=DEVICE, seed=2)
    k_scale, v_scale = (torch.tensor(s, device=DEVICE) for s in SCALES[scales])
    k_ref, v_ref = quantize_kv(c.k_cache_ref, k_scale), quantize_kv(c.v_cache_ref, v_scale)
    k_fp8, v_fp8 = k_ref.clone(), v_ref.clone()
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    ref = paged_attention_reference(c.q, c.k, c.v, k_ref, v_ref, *meta, -1, 0.0, None, k_scale, v_scale)
    out = torch.full_like(c.q, float("nan"))
    paged_attention.paged_attention_out(
        c.q, c.k, c.v, k_fp8, v_fp8, *meta, -1, 0.0, None, out,
        k_scale=k_scale, v_scale=v_scale, **launch,
    )  # fmt: skip
    assert k_fp8.dtype == FP8_KV_DTYPE
    assert torch.equal(k_fp8.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_fp8.view(torch.uint8), v_ref.view(torch.uint8))
    n = c.num_real
    assert rel_err(out[:n], ref[:n]) <= TOL[dtype]


def test_triton_fp8_cache_needs_scales() -> None:
    c = make_paged_case([1], [9], 4, 2, 32, block_size=8, device=DEVICE)
    cache = quantize_kv(c.k_cache_ref, torch.tensor([1.0], device=DEVICE))
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        paged_attention.paged_attention_out(
            c.q, c.k, c.v, cache, cache.clone(), *meta, -1, 0.0, None, c.q.clone()
        )
    assert paged_attention.supported(c.q, cache, cache)
