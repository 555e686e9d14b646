"""The GPU's SM clock and power draw while a benchmark case runs, sampled with `nvidia-smi`.

A power-capped card lowers its clock under sustained load (H200, bf16 256 x 2,048/128: 1,560-1,610 MHz at
683-696 W of a 700 W limit, 1,980 MHz idle; benchmarks/RESULTS.md, fifteenth session), so a case's fraction
of the roofline depends on the clock it ran at: the throughput rows carry it.

    with ClockSampler() as clocks:
        run_the_case()
    row.update(clocks.summary())   # {} where nvidia-smi is missing or printed nothing
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from types import TracebackType
from typing import Any

QUERY = ["--query-gpu=index,clocks.sm,power.draw", "--format=csv,noheader,nounits"]


class ClockSampler:
    """Runs `nvidia-smi ... --loop-ms=PERIOD` for the block's duration; summary() gives per-GPU medians."""

    def __init__(self, period_ms: int = 200) -> None:
        self.period_ms = period_ms
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []

    def __enter__(self) -> ClockSampler:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            self._proc = subprocess.Popen(
                [exe, *QUERY, f"--loop-ms={self.period_ms}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self._lines = out.splitlines()

    def summary(self) -> dict[str, Any]:
        """{"gpu_sm_clock_mhz": {gpu: [median, min]}, "gpu_power_w": {gpu: median}, "gpu_clock_samples": n}."""
        clocks: dict[str, list[float]] = {}
        power: dict[str, list[float]] = {}
        for line in self._lines:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 3:
                continue
            try:
                mhz, watts = float(fields[1]), float(fields[2])
            except ValueError:  # "[N/A]" and the like
                continue
            clocks.setdefault(fields[0], []).append(mhz)
            power.setdefault(fields[0], []).append(watts)
        if not clocks:
            return {}
        return {
            "gpu_sm_clock_mhz": {g: [statistics.median(v), min(v)] for g, v in clocks.items()},
            "gpu_power_w": {g: statistics.median(v) for g, v in power.items()},
            "gpu_clock_samples": sum(len(v) for v in clocks.values()),
        }
