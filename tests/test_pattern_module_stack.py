"""Pattern passes keep each replaced node's module path, whatever the torch version's matcher copies.

torch 2.11's pattern matcher (the GPU machines') does not copy `nn_module_stack` onto replacement nodes;
torch 2.13's does. expose_hidden_states (EAGLE-3) finds layers by that path, and failed on the GPU with
"no input norm found for layers [2, 16, 29]". The second test makes this torch's matcher behave like
2.11's and checks that fxllm's PatternPass puts the path back.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._inductor import pattern_matcher

from fxllm.compiler import compile_model
from fxllm.models import load_model
from fxllm.passes.graph_utils import layer_index

NORMS = (torch.ops.fxllm.rms_norm.default, torch.ops.fxllm.fused_add_rms_norm.default)


def _norm_paths() -> list[tuple[str, int | None]]:
    model = load_model("tiny-llama", dtype="float32").model
    compiled = compile_model(model, backend="eager", passes={"lower_ops": False})
    paths = []
    for node in compiled.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in NORMS:
            stack = node.meta.get("nn_module_stack") or {}
            last = list(stack.values())[-1] if stack else ("", None)
            paths.append((str(last[0] if isinstance(last, tuple) else last), layer_index(node)))
    return paths


def _check(paths: list[tuple[str, int | None]], num_layers: int) -> None:
    assert len(paths) == 2 * num_layers + 1  # input + post-attention norm per layer, and the final norm
    input_norms = [layer for path, layer in paths if path.endswith("input_layernorm")]
    assert input_norms == list(range(num_layers))
    post_norms = [layer for path, layer in paths if path.endswith("post_attention_layernorm")]
    assert post_norms == list(range(num_layers))
    assert paths[-1][0].endswith("norm") and paths[-1][1] is None


def test_norms_carry_their_module_path() -> None:
    layers = load_model("tiny-llama", dtype="float32").model.config.num_hidden_layers
    _check(_norm_paths(), layers)


def test_paths_kept_when_the_matcher_drops_them(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pattern_matcher._transfer_meta

    def transfer_without_stack(
        new_meta: dict[str, Any], old_node: torch.fx.Node, *args: Any, **kw: Any
    ) -> None:
        original(new_meta, old_node, *args, **kw)
        new_meta.pop("nn_module_stack", None)  # as torch 2.11's matcher leaves it

    monkeypatch.setattr(pattern_matcher, "_transfer_meta", transfer_without_stack)
    layers = load_model("tiny-llama", dtype="float32").model.config.num_hidden_layers
    _check(_norm_paths(), layers)
