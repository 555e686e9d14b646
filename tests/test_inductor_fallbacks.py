"""fxllm's custom ops reach Inductor as explicit fallbacks (fxllm/compiler/inductor_fallbacks.py): Inductor's
implicit fallback formats every IR argument of the op for an info message (eagerly on torch 2.11: the FP8
fused-quantization build hung > 200 s in it on an H200); registered first, that message is never built."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._inductor import exc, lowering
from torch._inductor.compile_fx import compile_fx
from torch.fx.experimental.proxy_tensor import make_fx

from fxllm.compiler.inductor_fallbacks import register_custom_op_fallbacks


def _make_op(name: str) -> None:
    """A fresh fxllm-namespace op with no Inductor lowering: a registration is process-wide, so each case needs
    an op of its own."""

    @torch.library.custom_op(f"fxllm_fallback_test::{name}", mutates_args=())
    def op(x: torch.Tensor) -> torch.Tensor:
        return x * 3.0

    @op.register_fake
    def _fake(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)


_make_op("scale_a")
_make_op("scale_b")


def _graph(op: object) -> torch.fx.GraphModule:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(4):  # a chain of pointwise producers: the op's argument is a nested IR node
            y = torch.sin(y) + 1.0
        return op(y) + 1.0  # type: ignore[operator]

    return make_fx(f)(torch.randn(8, 16))


@pytest.mark.parametrize("register", [False, True])
def test_registered_ops_skip_the_implicit_fallback_message(
    register: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    op = (
        torch.ops.fxllm_fallback_test.scale_b.default
        if register
        else torch.ops.fxllm_fallback_test.scale_a.default
    )
    formatted: list[object] = []
    original = exc.OperatorIssue.operator_str

    def counting(target: object, args: list[object], kwargs: dict[str, object]) -> str:
        formatted.append(target)
        return original(target, args, kwargs)

    monkeypatch.setattr(exc.OperatorIssue, "operator_str", staticmethod(counting))
    caplog.set_level(
        logging.INFO, logger="torch._inductor.graph"
    )  # 2.13 formats the message only when logged
    gm = _graph(op)
    x = torch.randn(8, 16)
    expected = gm(x)
    if register:
        assert register_custom_op_fallbacks(gm) == 1
        assert op in lowering.lowerings
        assert register_custom_op_fallbacks(gm) == 0  # once per op
    compiled = compile_fx(gm, [x])
    out = compiled(x)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, expected)
    assert (op in formatted) is (not register), f"operator_str formatted {formatted}"
