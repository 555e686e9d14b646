"""Canonical fxllm custom ops: schema, reference implementation, fake implementation.

Importing this package registers every op under the `torch.ops.fxllm` namespace. Passes target
these ops; backends (fxllm.backends) provide faster implementations of them.
"""

from __future__ import annotations

from fxllm.ops.activations import gelu_and_mul, silu_and_mul
from fxllm.ops.attention import attention, attention_reference
from fxllm.ops.collectives import all_reduce, all_reduce_add_rms_norm
from fxllm.ops.fp8_fused import fused_add_rms_norm_fp8, gelu_and_mul_fp8, rms_norm_fp8, silu_and_mul_fp8
from fxllm.ops.fp8_linear import fp8_linear, fp8_linear_reference
from fxllm.ops.gemm import linear, linear_reference
from fxllm.ops.linear import pack_linear_weight, packed_linear, unpack_linear_weight
from fxllm.ops.norms import fused_add_rms_norm, rms_norm, rms_norm_reference
from fxllm.ops.paged_attention import (
    paged_attention,
    paged_attention_reference,
    paged_attention_rope,
    paged_attention_rope_reference,
    write_kv_cache,
)
from fxllm.ops.rotary import rotary_embedding, rotary_embedding_reference

__all__ = [
    "all_reduce",
    "all_reduce_add_rms_norm",
    "attention",
    "attention_reference",
    "fp8_linear",
    "fp8_linear_reference",
    "fused_add_rms_norm",
    "fused_add_rms_norm_fp8",
    "gelu_and_mul",
    "gelu_and_mul_fp8",
    "linear",
    "linear_reference",
    "pack_linear_weight",
    "packed_linear",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_rope",
    "paged_attention_rope_reference",
    "rms_norm",
    "rms_norm_fp8",
    "rms_norm_reference",
    "rotary_embedding",
    "rotary_embedding_reference",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "unpack_linear_weight",
    "write_kv_cache",
]
