"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def native_op() -> Callable[[str], Callable[..., torch.Tensor]]:
    """`native_op(name)`: fxllm op `name` through the dispatcher with the CPU backend bound and its
    native C++ kernel installed; skips the test where the native library did not build."""

    def get(name: str) -> Callable[..., torch.Tensor]:
        from fxllm.backends.cpu import native
        from fxllm.backends.registry import bind_op_backends

        bind_op_backends("cpu")
        if not native.install(name):
            pytest.skip("the native CPU kernels did not build")
        return getattr(torch.ops.fxllm, name).default

    return get
