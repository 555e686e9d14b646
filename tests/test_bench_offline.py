"""`fxllm bench` helpers that need no model: the ratio table and the bandwidth probe."""

from __future__ import annotations

import math

import pytest

from fxllm.serve.bench_offline import BenchResult, format_results, random_prompts, read_bandwidth_gbs


def test_format_results_prints_ratios_per_scenario() -> None:
    rows = [
        BenchResult("fxllm", "batch1-decode", 63, 0.5, 126.0),
        BenchResult("fxllm", "throughput-c16", 1024, 2.0, 512.0),
        BenchResult("hf-eager", "batch1-decode", 63, 1.5, 42.0),
        BenchResult("hf-eager", "throughput-c16", 1024, 8.0, 128.0),
    ]
    table = format_results(rows)
    assert "ratio fxllm/hf batch1-decode: 3.00x" in table
    assert "ratio fxllm/hf throughput-c16: 4.00x" in table


def test_random_prompts_are_seeded_and_skip_low_ids() -> None:
    a, b = random_prompts(3, 20, 500, seed=7), random_prompts(3, 20, 500, seed=7)
    assert a == b and a != random_prompts(3, 20, 500, seed=8)
    assert all(len(p) == 20 and min(p) >= 100 and max(p) < 500 for p in a)


def test_read_bandwidth_probe() -> None:
    gbs = read_bandwidth_gbs(megabytes=16, repeats=2)
    assert math.isfinite(gbs) and gbs > 0.1  # any machine reads 16 MB faster than 0.1 GB/s
    with pytest.raises(ValueError, match="positive"):
        read_bandwidth_gbs(megabytes=0)
