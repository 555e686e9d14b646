"""Fixtures shared by several test files."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def native_op() -> Callable[[str], torch._ops.OpOverload]:
    """`native_op(name)`: the C++ CPU op `torch.ops.fxllm_cpu.<name>.default`; skips the test where the
    library (fxllm/backends/cpu/csrc) did not build."""

    def get(name: str) -> torch._ops.OpOverload:
        from fxllm.backends.cpu import native

        op = native.op(name)
        if op is None:
            pytest.skip("the C++ CPU kernels did not build (see the log for the compiler's message)")
        return op

    return get
