"""The engine's counters and phase timings, as /metrics and `fxllm bench` read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Engine counters, as the server's /metrics and `fxllm bench` report them."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_preemptions: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    # Wall seconds per phase of step(), summed: where a step's host time goes. The forward launches
    # asynchronously on a GPU, so its device time shows up in `sample_seconds` (the first sync).
    schedule_seconds: float = 0.0
    inputs_seconds: float = 0.0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0
    update_seconds: float = 0.0
    # Where the host and the device do not overlap. `result_wait_seconds`: host time blocked waiting for a
    # step's sampled ids (part of `sample_seconds`). `overlap_seconds`: host time between enqueueing a
    # step's sampling and starting to wait for its ids, i.e. host work done while that step may still run
    # on the device (async scheduling; ~0 when synchronous). `gpu_idle_seconds` (CUDA only, 0 on the CPU):
    # gaps on the GPU timeline between one step's last op and the next step's first, measured with CUDA
    # events: the host time not overlapped with the GPU.
    result_wait_seconds: float = 0.0
    overlap_seconds: float = 0.0
    gpu_idle_seconds: float = 0.0
    # Python garbage collections while this engine ran (gc_heap.py): full (generation 2) ones and the
    # seconds of all generations. On a GPU a long one shows up as GPU idle time: the host feeds every step.
    gc_full_collections: int = 0
    gc_pause_seconds: float = 0.0
