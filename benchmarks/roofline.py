"""A roofline model of the offline-throughput scenarios: the time the card could not beat.

Per decode step of B sequences: max(bytes / bandwidth, flops / peak), bytes = every weight once plus
the KV cache the step reads; flops = 2 x params x B plus attention (4 x layers x heads x head_dim per
context token and sequence). Prefill: flops only (2 x params per token plus causal attention). The
requests run in waves of `max_num_seqs`. Constants: the H100's 3.02 TB/s measured copy rate
(DESIGN.md, "Numbers to beat") and 989 TFLOP/s dense bf16 peak, scaled by card for the H200.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CARDS = {"H100": (3.02e12, 989e12), "H200": (4.33e12, 989e12)}  # (bytes/s, bf16 flop/s)


@dataclass
class ModelShape:
    """What the model costs per token: parameters (matmul weights incl. the LM head), KV bytes, attention."""

    params: float
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0

    @classmethod
    def from_hf_config(cls, config: Any, num_params: float) -> ModelShape:
        """Shape of an HF decoder config; `num_params` counts every weight the forward reads (no embedding)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            params=num_params, layers=config.num_hidden_layers, heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim=head_dim,
        )  # fmt: skip

    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_elem

    def attention_flops(self, context: float) -> float:
        """Q.K and P.V of one query token against `context` keys, every layer and head."""
        return 4 * self.layers * self.heads * self.head_dim * context


def decoder_linear_params(config: Any) -> int:
    """Matmul weights a Llama-style decoder reads per step, from its HF config: q, k, v, o, gate, up and down
    of every layer, and the LM head (the embedding table is a lookup)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config.intermediate_size
    return int(config.num_hidden_layers * per_layer + config.vocab_size * hidden)


def card_limits(device_name: str) -> tuple[float, float] | None:
    """(bandwidth bytes/s, peak flop/s) of the card, or None when it is not in the table."""
    return next((v for k, v in CARDS.items() if k in device_name), None)


def ideal_seconds(
    shape: ModelShape, num: int, input_len: int, output_len: int, max_num_seqs: int, device_name: str
) -> dict[str, float] | None:
    """Ideal prefill, decode and total seconds of `num` requests of input_len / output_len tokens."""
    limits = card_limits(device_name)
    if limits is None:
        return None
    bandwidth, peak = limits
    weight_bytes = shape.params * shape.bytes_per_param
    prefill_flops = num * (2 * shape.params * input_len + shape.attention_flops(input_len * input_len / 2))
    prefill = prefill_flops / peak
    decode = 0.0
    waves = math.ceil(num / max_num_seqs)
    for wave in range(waves):
        batch = min(max_num_seqs, num - wave * max_num_seqs)
        for step in range(output_len - 1):  # the first output token comes from the prefill
            context = input_len + step + 1
            bytes_read = weight_bytes + batch * context * shape.kv_bytes_per_token()
            flops = batch * (2 * shape.params + shape.attention_flops(context))
            decode += max(bytes_read / bandwidth, flops / peak)
    total = prefill + decode
    return {"prefill_s": prefill, "decode_s": decode, "total_s": total, "out_tok_s": num * output_len / total}
