"""C++ kernels for fxllm's ops on the CPU, registered as the "cpu" implementation.

Importing this package registers `fxllm_cpu::paged_attention` and `fxllm_cpu::packed_linear`
(priority 5, so the lowering pass picks them for CPU nodes of float32 or bfloat16), and oneDNN over a
pre-packed weight for `fxllm::linear` (`fxllm_cpu::onednn_linear`, onednn_linear.py). The library
builds on first use (native.py); if it does not build, the lowering falls back to the reference
and logs how many nodes did.
"""

from __future__ import annotations

import logging

import torch

from fxllm.backends.registry import OpSite

logger = logging.getLogger(__name__)

BACKEND = "cpu"
PRIORITY = 5
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_LOGGED_CACHE_DTYPES: set[torch.dtype] = set()  # log the FP8-cache fallback once per dtype, not per layer


def supports(site: OpSite) -> bool:
    """CPU nodes whose activations are float32 or bfloat16 (other dtypes run the reference)."""
    return site.device.type == "cpu" and site.dtype in KERNEL_DTYPES


def supports_attention(site: OpSite) -> bool:
    """As `supports`, and caches of the activations' dtype: FP8 caches run the reference (logged once)."""
    if not supports(site):
        return False
    k_cache = site.args[3] if len(site.args) > 3 else None
    if isinstance(k_cache, torch.Tensor) and k_cache.dtype not in KERNEL_DTYPES:
        if k_cache.dtype not in _LOGGED_CACHE_DTYPES:
            _LOGGED_CACHE_DTYPES.add(k_cache.dtype)
            logger.info("the C++ CPU attention kernel reads float32/bfloat16 caches only: paged_attention over a %s "
                        "KV cache runs the reference", k_cache.dtype)  # fmt: skip
        return False
    return True


def _register() -> None:
    import fxllm.ops  # noqa: F401  (ops must exist before backends register for them)
    from fxllm.backends.cpu import native, onednn_linear
    from fxllm.backends.registry import register_op_backend

    for op, check in (("paged_attention", supports_attention), ("packed_linear", supports)):
        register_op_backend(
            op, BACKEND, target=lambda op=op: native.op(op), supports=check, _builtin=True, priority=PRIORITY
        )
    # fxllm::linear, where the packed kernel above cannot take a linear (pack_linears hands it over).
    register_op_backend("linear", onednn_linear.BACKEND, target=lambda: native.op("onednn_linear"),
                        supports=onednn_linear.supports, _builtin=True, priority=onednn_linear.PRIORITY)  # fmt: skip


_register()
