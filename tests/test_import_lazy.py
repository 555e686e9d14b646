"""Imports that must stay lazy: what each entry point pulls into sys.modules (issue 13, start-up time).

Not a timing test: each case imports one module in a fresh interpreter and checks that heavy packages it
does not need (torch, torch._dynamo, transformers, the server stack, ...) are absent from sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SERVER_STACK = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client")
MODEL_ZOO = ("transformers", "gguf", "tokenizers", "safetensors")


def _modules_after(statement: str) -> set[str]:
    """sys.modules of a fresh interpreter (repo root on the path) after running `statement`."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    ("statement", "expected", "forbidden"),
    [
        # `import fxllm` (and the torch.compile backend entry point's package) costs nothing.
        ("import fxllm", "fxllm", ("torch", "numpy", "yaml", "triton", *SERVER_STACK, *MODEL_ZOO)),
        # The console script's module: `fxllm --help` and argument errors answer without torch.
        ("import fxllm.serve.cli", "fxllm.serve.cli", ("torch", "triton", *SERVER_STACK, *MODEL_ZOO)),
        # `fxllm cache list` / `clear`: torch (the entry format), not Dynamo, the ops or the compiler API.
        (
            "import fxllm.compiler.cache",
            "torch",
            (
                "torch._dynamo",
                "triton",
                "sympy",
                "fxllm.ops",
                "fxllm.compiler.api",
                *SERVER_STACK,
                *MODEL_ZOO,
            ),
        ),
        # The engine (LLM, the offline API): no server stack; transformers and gguf come with the model load,
        # Inductor's pattern matcher with the passes (a warm start loads a cached graph without them).
        (
            "import fxllm.llm",
            "torch._dynamo",
            (*SERVER_STACK, *MODEL_ZOO, "torch._inductor.compile_fx", "torch._inductor.pattern_matcher"),
        ),
        # A warm start's cache key registers the built-in passes; Inductor's matcher (~0.5 s more than the
        # artifact load needs) comes only when a pattern pass runs.
        (
            "from fxllm.compiler.cache_key import registered_code\nregistered_code()",
            "fxllm.passes.match_gated_mlp",
            ("torch._inductor.pattern_matcher", "torch._inductor.compile_fx", *SERVER_STACK),
        ),
    ],
)
def test_entry_point_imports_stay_lazy(statement: str, expected: str, forbidden: tuple[str, ...]) -> None:
    """Importing the entry point leaves the heavy packages it does not need unimported."""
    modules = _modules_after(statement)
    assert expected in modules  # the probe saw the import happen
    pulled = sorted(name for name in forbidden if name in modules)
    assert not pulled, f"`{statement}` imported {pulled}: make those imports lazy (issue 13)"


def test_lazy_package_attributes_resolve() -> None:
    """The lazy re-exports of fxllm and fxllm.compiler resolve to the real objects; unknown names fail."""
    modules = _modules_after(
        "import fxllm, fxllm.compiler\n"
        "from fxllm.compiler.api import compile_model\n"
        "from fxllm.compiler.capture import CaptureError\n"
        "assert fxllm.compiler.compile_model is compile_model\n"
        "assert fxllm.compiler.CaptureError is CaptureError\n"
        "assert fxllm.compile is fxllm.compiler.compile\n"
        "try:\n    fxllm.compiler.no_such_name\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('fxllm.compiler.no_such_name resolved')\n"
    )
    assert "fxllm.compiler.api" in modules
