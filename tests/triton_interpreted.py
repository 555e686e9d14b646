"""Triton kernel modules for the kernel tests: interpreted on a machine without a GPU, compiled with one.

triton.jit picks the interpreter when a kernel is defined, that is when its module is imported with
TRITON_INTERPRET=1. Importing this sets it on a CPU machine (and leaves it set: triton reads it again lazily,
and nothing else runs Triton kernels on a machine without a GPU); `interpreted(...)` then hands out the
kernel modules, reloaded where another test module imported them as GPU kernels first, so a kernel test runs
whatever the import order.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _compiled_kernels(module: ModuleType) -> list[str]:
    from triton.runtime.jit import JITFunction

    return [name for name, value in vars(module).items() if isinstance(value, JITFunction)]


def interpreted(*names: str) -> list[ModuleType]:
    """`fxllm.backends.triton.<name>` for each name, interpreted on a CPU machine; skips without triton.

    Name a module after the modules whose kernels it calls (reloads run in the order given): a module
    without kernels of its own (selfcheck) is reloaded too, so it calls the interpreted ones.
    """
    pytest.importorskip("triton", reason="triton is not installed")
    modules = [importlib.import_module(f"fxllm.backends.triton.{name}") for name in names]
    if DEVICE != "cpu":
        return modules
    import fxllm.backends.triton as tb

    tb.patch_interpreter()  # idempotent; done at import already unless triton came in before TRITON_INTERPRET
    if not any(_compiled_kernels(m) for m in modules):
        return modules
    modules = [importlib.reload(m) for m in modules]
    left = {m.__name__: _compiled_kernels(m) for m in modules if _compiled_kernels(m)}
    assert not left, f"Triton's interpreter could not be set up; still compiled: {left}"
    return modules


def record_launches(monkeypatch: pytest.MonkeyPatch, module: ModuleType, kernel_name: str) -> list[dict]:
    """The keyword arguments of every launch of `module.kernel_name` during the test; the kernel still runs."""
    launched: list[dict] = []
    kernel = getattr(module, kernel_name)

    class Spy:
        def __getitem__(self, grid: tuple) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                launched.append(kwargs)
                kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, kernel_name, Spy())
    return launched
