"""benchmarks/gpu_clocks.py: the clock sampler parses what nvidia-smi prints and is silent without it."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

# benchmarks/ is not a package: load the module from its file.
_SPEC = importlib.util.spec_from_file_location(
    "gpu_clocks", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_clocks.py"
)
assert _SPEC is not None and _SPEC.loader is not None
gpu_clocks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_clocks)
ClockSampler = gpu_clocks.ClockSampler

# A stand-in nvidia-smi: two GPUs' rows every period, one unreadable power reading, until terminated.
FAKE_SMI = """#!/bin/sh
while true; do
  echo "0, 1980, 120.5"
  echo "1, 1575, 690.0"
  echo "0, 1560, [N/A]"
  sleep 0.05
done
"""


def test_summary_has_per_gpu_medians_and_skips_unreadable_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with ClockSampler(period_ms=50) as clocks:
        time.sleep(0.4)
    got = clocks.summary()
    assert got["gpu_sm_clock_mhz"]["0"] == [1980.0, 1980.0]  # the [N/A] row is dropped whole
    assert got["gpu_sm_clock_mhz"]["1"] == [1575.0, 1575.0]
    assert got["gpu_power_w"] == {"0": 120.5, "1": 690.0}
    assert got["gpu_clock_samples"] >= 4


def test_without_nvidia_smi_the_summary_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with ClockSampler() as clocks:
        pass
    assert clocks.summary() == {}
