"""fxllm: a PyTorch-native LLM inference compiler and server."""
from __future__ import annotations

__version__ = "0.1.0"
