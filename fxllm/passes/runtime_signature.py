"""The runtime signature: the typed contract between the runtime passes and the model runner.

The cache passes add graph inputs (attention metadata, one key and one value cache per layer, the
logits indices). Each input they add is recorded here, with its role; the KV layers carry their
cache geometry. The runner and the CUDA-graph code read only this, stored on the graph as
`gm.meta["fxllm_runtime_signature"]`, never placeholder names or node arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.fx import GraphModule

SIGNATURE_KEY = "fxllm_runtime_signature"

InputRole = Literal[
    "input_ids", "position_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
    "k_cache", "v_cache", "logits_indices",
]  # fmt: skip
STEP_INPUT_ROLES: tuple[InputRole, ...] = (
    "input_ids", "position_ids", "slot_mapping", "block_tables", "seq_lens", "query_start_loc", "logits_indices",
)  # fmt: skip


@dataclass(frozen=True)
class GraphInput:
    """One graph input: its placeholder name, what it holds, and its dtype."""

    name: str
    role: InputRole
    dtype: torch.dtype
    layer: int | None = None  # KV caches only


@dataclass(frozen=True)
class KVCacheLayer:
    """One attention layer's cache: its two inputs and their geometry ([blocks, block_size, heads, dim])."""

    layer: int
    key_input: str
    value_input: str
    num_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    dtype: torch.dtype


@dataclass
class RuntimeSignature:
    """Inputs in graph order, the KV layers in layer order, and what the graph returns."""

    inputs: list[GraphInput] = field(default_factory=list)
    kv_layers: list[KVCacheLayer] = field(default_factory=list)
    # The graph returns (logits [1, N, V],): rows for the flat positions in `logits_indices` only, in
    # the model's dtype, once gather_logits ran; else logits for every token.
    logits_rows: Literal["all", "logits_indices"] = "all"

    @property
    def input_names(self) -> list[str]:
        """Placeholder names in the order the graph takes them."""
        return [i.name for i in self.inputs]

    def input_for(self, role: InputRole) -> GraphInput | None:
        """The (single) input holding `role`, if any."""
        return next((i for i in self.inputs if i.role == role), None)

    def arguments(
        self, step: Mapping[str, torch.Tensor], caches: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """The graph's arguments in order: step inputs looked up by role, KV caches by input name."""
        return [caches[i.name] if i.role in ("k_cache", "v_cache") else step[i.role] for i in self.inputs]

    def check(self, gm: GraphModule) -> None:
        """Fail unless `gm`'s placeholders are exactly these inputs, in this order."""
        names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
        if names != self.input_names:
            raise RuntimeError(
                f"the graph's inputs {names} do not match its runtime signature {self.input_names}: a pass "
                "added or removed an input without recording it (use runtime_signature.add_input)"
            )


def runtime_signature(gm: GraphModule) -> RuntimeSignature | None:
    """The signature the runtime passes stored on `gm`, or None for a graph they did not transform."""
    return gm.meta.get(SIGNATURE_KEY)


def ensure_signature(gm: GraphModule) -> RuntimeSignature:
    """The graph's signature, created from its capture inputs (input_ids, position_ids) on first use."""
    signature = runtime_signature(gm)
    if signature is None:
        captured = [n for n in gm.graph.nodes if n.op == "placeholder"]
        roles: tuple[InputRole, ...] = ("input_ids", "position_ids")
        if len(captured) != len(roles):
            raise RuntimeError(f"a captured graph takes (input_ids, position_ids); this one takes {captured}")
        signature = RuntimeSignature(
            [GraphInput(str(n.target), role, torch.long) for n, role in zip(captured, roles)]
        )
        gm.meta[SIGNATURE_KEY] = signature
    return signature


def require_signature(gm: GraphModule) -> RuntimeSignature:
    """The graph's signature, checked against its placeholders; a clear error when the passes did not run."""
    signature = runtime_signature(gm)
    if signature is None or not signature.kv_layers:
        raise RuntimeError(
            "this graph has no runtime signature with KV layers: build it with the runtime passes "
            "(run_passes(..., include_runtime=True)) and keep insert_cached_attention enabled"
        )
    signature.check(gm)
    return signature
