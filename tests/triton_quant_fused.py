"""The Triton FP8-producing kernels (quant_fused, with the norms and activations they build on) for kernel tests.

Importing this sets TRITON_INTERPRET=1 on a CPU machine before triton is imported, skips the importing test
module when triton is missing, and reloads the kernels as interpreted functions when another module imported
them as GPU kernels first (see test_triton_kernels.py). Test modules take `DEVICE`, `norms`, `activations`
and `quant_fused` from here.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fxllm.backends.triton as tb  # noqa: E402
from fxllm.backends.triton import activations, norms, quant_fused  # noqa: E402

if DEVICE == "cpu" and not isinstance(quant_fused._gated_fp8_kernel, InterpretedFunction):
    tb.patch_interpreter()
    norms, activations, quant_fused = (importlib.reload(m) for m in (norms, activations, quant_fused))

__all__ = ["DEVICE", "activations", "norms", "quant_fused"]
