"""linear_ops: constant-weight linears become fxllm::linear on CUDA graphs only, with the same values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxllm.passes.linear_ops import linear_ops
from fxllm.passes.registry import PassContext


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(x)))
        return F.linear(h, w)  # weight is a graph input: left alone


def _exported() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    args = (torch.randn(3, 16), torch.randn(8, 16))
    return torch.export.export(_Block().eval(), args).run_decompositions({}).module(), args


def _targets(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrites_constant_linears_on_cuda_graphs() -> None:
    gm, args = _exported()
    expected = gm(*args)
    result = linear_ops(gm, PassContext(device=torch.device("cuda")))
    assert result.num_matches == 2
    assert _targets(gm).count(torch.ops.fxllm.linear.default) == 2
    assert _targets(gm).count(torch.ops.aten.linear.default) == 1
    assert any("not a constant" in note for note in result.notes)
    # The op's CPU kernel is its reference, so the graph still runs here with the same values.
    torch.testing.assert_close(gm(*args), expected, rtol=0, atol=0)


def test_leaves_cpu_graphs_alone() -> None:
    gm, _ = _exported()
    result = linear_ops(gm, PassContext(device=torch.device("cpu")))
    assert result.num_matches == 0 and "stays" in result.notes[0]
    assert torch.ops.fxllm.linear.default not in _targets(gm)
