"""GPU kernel times from a torch.profiler profile, shared by the GPU benchmark scripts.

gpu_prefill_mix.py, gpu_profile.py, gpu_decode_kernels.py and gpu_tp_engine.py each summed the CUDA events of a
profile by some key (kernel name, kernel kind); this is that sum, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


# torch is imported where used: gpu_tp.py's parent process imports this through gpu_tp_engine.py without it.
def cuda_kernels(prof: Any) -> list[Any]:
    """The profile's GPU-side events (kernels, memsets, copies), in the profiler's order."""
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


def profile_cuda(fn: Callable[[], object], calls: int) -> Any:
    """A torch.profiler profile (CUDA activity only) of `calls` calls of `fn`, the GPU synchronized around it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_us_by(prof: Any, key: Callable[[str], str], per: float = 1.0) -> dict[str, float]:
    """GPU microseconds of the profile's kernels summed by `key(name)`, divided by `per`, largest first."""
    totals: dict[str, float] = {}
    for event in cuda_kernels(prof):
        k = key(event.name)
        totals[k] = totals.get(k, 0.0) + event.time_range.elapsed_us() / per
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
