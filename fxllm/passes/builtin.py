"""Imports every built-in pass module so that each registers itself."""

from __future__ import annotations

from fxllm.passes import (  # noqa: F401
    cleanup,
    expose_hidden_states,
    fuse_add_rms_norm,
    fuse_fp8_quant,
    fuse_rope_attention,
    gather_logits,
    insert_cached_attention,
    linear_ops,
    lower_ops,
    match_attention,
    match_gated_mlp,
    match_rms_norm,
    match_rope,
    merge_fp8_linears,
    merge_linears,
    pack_linears,
    quantize_fp8,
    shard_tp,
)
