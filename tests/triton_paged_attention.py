"""The Triton paged-attention module for kernel tests: on a CPU, run by Triton's interpreter.

Importing this sets TRITON_INTERPRET=1 on a CPU machine before triton is imported, skips the importing test
module when triton is missing, and reloads the kernels as interpreted functions when another module imported
them as GPU kernels first (see test_triton_kernels.py). Test modules take `DEVICE` and `paged_attention` from here.
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
from fxllm.backends.triton import paged_attention  # noqa: E402

if DEVICE == "cpu" and not isinstance(paged_attention._decode_kernel, InterpretedFunction):
    tb.patch_interpreter()
    paged_attention = importlib.reload(paged_attention)

__all__ = ["DEVICE", "paged_attention"]
