"""Quantization: FP8 (e4m3) scales and casts shared by the op, the passes and the checkpoint loaders."""

from __future__ import annotations
