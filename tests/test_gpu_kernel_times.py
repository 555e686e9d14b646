"""benchmarks/gpu_kernel_times.py: the GPU benchmark scripts' kernel-time sums, on a stand-in profile."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from torch.autograd import DeviceType

# benchmarks/ is not a package: load the module from its file.
_SPEC = importlib.util.spec_from_file_location(
    "gpu_kernel_times", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernel_times.py"
)
assert _SPEC is not None and _SPEC.loader is not None
gpu_kernel_times = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_kernel_times)


def _event(name: str, us: float, device: DeviceType = DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))


PROFILE = SimpleNamespace(
    events=lambda: [
        _event("_decode_kernel_0", 30.0),
        _event("aten::mm", 500.0, DeviceType.CPU),  # the host side of a launch: not GPU time
        _event("nvjet_sm90_tst", 100.0),
        _event("_decode_kernel_0", 50.0),
        _event("_combine_kernel", 4.0),
    ]
)


def test_only_gpu_events_are_kernels() -> None:
    assert [e.name for e in gpu_kernel_times.cuda_kernels(PROFILE)] == [
        "_decode_kernel_0", "nvjet_sm90_tst", "_decode_kernel_0", "_combine_kernel"
    ]  # fmt: skip


def test_times_summed_by_key_per_call_largest_first() -> None:
    by_kind = gpu_kernel_times.kernel_us_by(PROFILE, lambda n: "gemm" if "nvjet" in n else "attention", per=2)
    assert list(by_kind.items()) == [("gemm", 50.0), ("attention", 42.0)]
    by_name = gpu_kernel_times.kernel_us_by(PROFILE, lambda n: n[:7])
    assert by_name == {"nvjet_s": 100.0, "_decode": 80.0, "_combin": 4.0}
