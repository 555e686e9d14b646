"""Verify-shaped attention (issue 16): sequences with 1 + k query tokens on top of a cached context.

A speculative step gives each verifying sequence 1 + k queries at the end of its context, causal among
themselves, mixed with plain decodes (1 query) and a prefill chunk, plus padding rows. The C++ CPU
kernel and the Triton kernel (Triton's interpreter on a CPU-only box) must equal the reference:
relative error < 1e-5 in float32 (only the summation order differs).
"""

from __future__ import annotations

from typing import Any

import torch
from triton_interpreted import DEVICE, interpreted

from fxllm.ops import paged_attention_reference

Q_LENS = [5, 1, 9, 2, 1, 12]  # k = 4, a decode, k = 8, k = 1, a decode, a prefill chunk
CTX_LENS = [37, 20, 9 + 40, 18, 1, 12]  # the first query of each sits right after its cached context


def _case(device: str = "cpu") -> Any:
    (selfcheck,) = interpreted("selfcheck")
    return selfcheck.make_paged_case(Q_LENS, CTX_LENS, 8, 2, 32, pad_tokens=2, seed=3, device=device)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_cpu_kernel_verify_shapes(native_op) -> None:
    c = _case()
    args = (c.q, c.k, c.v)
    tail = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale, -1, 0.0, None)
    ref = paged_attention_reference(*args, c.k_cache_ref.clone(), c.v_cache_ref.clone(), *tail)
    out = native_op("paged_attention")(*args, c.k_cache_ref.clone(), c.v_cache_ref.clone(), *tail)
    assert _relative_error(out[: c.num_real], ref[: c.num_real]) < 1e-5


def test_triton_kernel_verify_shapes() -> None:
    _, selfcheck = interpreted("paged_attention", "selfcheck")
    c = selfcheck.make_paged_case(Q_LENS, CTX_LENS, 8, 2, 32, pad_tokens=2, seed=3, device=DEVICE)
    result = selfcheck.check_paged(c, "verify", block_m=16, block_n=16, num_splits=3)
    assert result["ok"], result
