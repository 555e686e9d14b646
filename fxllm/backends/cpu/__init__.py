"""C++ kernels for fxllm's ops on the CPU, registered as the "cpu" implementation.

Importing this package registers `fxllm_cpu::paged_attention` and `fxllm_cpu::packed_linear`
(priority 5, so the lowering pass picks them for CPU nodes of float32 or bfloat16). The library
builds on first use (native.py); if it does not build, the lowering falls back to the reference
and logs how many nodes did.
"""

from __future__ import annotations

import torch

from fxllm.backends.registry import OpSite

BACKEND = "cpu"
PRIORITY = 5
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def supports(site: OpSite) -> bool:
    """CPU nodes whose activations are float32 or bfloat16 (other dtypes run the reference)."""
    return site.device.type == "cpu" and site.dtype in KERNEL_DTYPES


def _register() -> None:
    import fxllm.ops  # noqa: F401  (ops must exist before backends register for them)
    from fxllm.backends.cpu import native
    from fxllm.backends.registry import register_op_backend

    for op in ("paged_attention", "packed_linear"):
        register_op_backend(op, BACKEND, target=lambda op=op: native.op(op), supports=supports, priority=PRIORITY)


_register()
