"""The Triton FP8-producing kernels (quant_fused, with the norms and activations they build on) for kernel tests.

Importing this skips the importing test module when triton is missing and hands out the kernels interpreted
on a CPU machine (tests/triton_interpreted.py). Test modules take `DEVICE`, `norms`, `activations` and
`quant_fused` from here.
"""

from __future__ import annotations

from triton_interpreted import DEVICE, interpreted

norms, activations, quant_fused = interpreted("norms", "activations", "quant_fused")

__all__ = ["DEVICE", "activations", "norms", "quant_fused"]
