"""C++ kernels for fxllm's ops on the CPU, registered as the "cpu" op backend.

Importing this package registers paged_attention and packed_linear (priority 5, so
`bind_op_backends("cpu")` picks them over the reference). Binding installs their C++ dispatcher
kernels (native.py) where those build, else the Python-bound kernels (paged_attention.py,
linear.py). Everything compiles on first use through Inductor's C++ code cache, the same compiler
Inductor needs for the rest of the CPU graph; if that fails the op falls back to the reference, so
registration never breaks a run.
"""

from __future__ import annotations

import torch

BACKEND = "cpu"
PRIORITY = 5


def supports(device: torch.device) -> bool:
    """CPU devices only."""
    return device.type == "cpu"


def _register() -> None:
    import fxllm.ops  # noqa: F401  (ops must exist before backends register for them)
    from fxllm.backends.cpu import linear, native, paged_attention
    from fxllm.backends.registry import NativeKernel, register_op_backend

    def native_kernel(op: str) -> NativeKernel:
        return NativeKernel("cpu", lambda: native.install(op), lambda: native.uninstall(op))

    register_op_backend("paged_attention", BACKEND, paged_attention.paged_attention, supports=supports,
                        priority=PRIORITY, native=native_kernel("paged_attention"))  # fmt: skip
    register_op_backend("packed_linear", BACKEND, linear.packed_linear, supports=supports, priority=PRIORITY,
                        native=native_kernel("packed_linear"))  # fmt: skip


_register()
