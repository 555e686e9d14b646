"""Capture a Hugging Face model into one FX graph, run the pass pipeline, compile it."""

from __future__ import annotations

from fxllm.compiler.api import CompiledModel, compile, compile_model
from fxllm.compiler.capture import CapturedGraph, CaptureError, capture

__all__ = ["CaptureError", "CapturedGraph", "CompiledModel", "capture", "compile", "compile_model"]
