"""The PTX for Hopper (sm_90) of the Triton collective kernels, compiled without a device, all in one subprocess.

Test modules register their kernels' variants at import; the first `ptx(name)` compiles every variant
registered by then (at run time: all the collected modules') in one Python process, where each was a
process of its own (~5 s of start-up and imports apiece). A process of its own, because a module that runs
Triton's interpreter (TRITON_INTERPRET=1, re-imported kernels, patched helpers) hands the compiler
functions it cannot take. ptxas comes with the triton wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest

_SCRIPT = """
import ast
import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for name, module, kernel, signature, constexprs, divisible in ast.literal_eval(sys.stdin.read()):
    fn = getattr(importlib.import_module(module), kernel)
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        text = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    except RuntimeError as exc:  # e.g. no ptxas in this triton build
        text = f"SKIP {exc}"
    print(f"=== {name} ===")
    print(text)
"""
_HEADER = re.compile(r"^=== (\S+) ===$", re.MULTILINE)

_variants: dict[str, tuple[Any, ...]] = {}
_compiled: dict[str, str] = {}


def register(
    name: str,
    module: str,
    kernel: str,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    divisible: tuple[int, ...] = (),
) -> None:
    """Register variant `name`: `module.kernel` compiled with `signature` and `constexprs`, the arguments at
    the indices `divisible` marked 16-byte divisible."""
    _variants[name] = (name, module, kernel, signature, constexprs, divisible)


def ptx(name: str) -> str:
    """The PTX of variant `name` (compiled with every other registered variant not compiled yet); skips the
    test where this triton cannot compile for sm_90."""
    if name not in _compiled:
        _compile([v for n, v in _variants.items() if n not in _compiled])
    text = _compiled[name]
    if text.startswith("SKIP"):
        pytest.skip(f"cannot compile for sm_90 here: {text}")
    return text


def _compile(variants: list[tuple[Any, ...]]) -> None:
    # The compiler, not the interpreter; the repository first on the path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], input=repr(variants), env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout  # fmt: skip
    parts = _HEADER.split(out)  # ["", name, text, name, text, ...]
    _compiled.update(zip(parts[1::2], parts[2::2]))
    missing = [v[0] for v in variants if v[0] not in _compiled]
    assert not missing, f"no PTX came back for {missing}: {out[-2000:]}"
