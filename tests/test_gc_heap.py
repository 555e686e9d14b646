"""The engine's Python-heap handling (fxllm/runtime/gc_heap.py): pauses counted, heap frozen and given back."""

from __future__ import annotations

import gc

from fxllm.llm import LLM
from fxllm.runtime.gc_heap import FROZEN_FULL_EVERY, pause_meter, should_freeze
from fxllm.runtime.sampling_params import SamplingParams

BASE = ["model.model=tiny-llama", "compile.backend=eager", "model.dtype=float32", "cache.num_blocks=64"]
PROMPTS = [[1, 5, 9, 13, 17], [2, 4, 8, 16, 32, 64]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_pause_meter_counts_full_collections() -> None:
    meter = pause_meter()
    assert pause_meter() is meter  # one callback per process
    before_n, before_s = meter.collections[2], meter.seconds[2]
    gc.collect()
    assert meter.collections[2] == before_n + 1
    assert meter.seconds[2] > before_s


def test_default_freezes_on_cuda_only() -> None:
    assert should_freeze(None, "cuda") and not should_freeze(None, "cpu")
    assert should_freeze(True, "cpu") and not should_freeze(False, "cuda")


def test_frozen_engine_generates_the_same_and_unfreezes_at_shutdown() -> None:
    gc.unfreeze()  # whatever an earlier test left
    thresholds = gc.get_threshold()
    plain = LLM(overrides=BASE)
    assert not plain.engine.heap_frozen and gc.get_freeze_count() == 0  # the CPU default: off
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY)]
    plain.shutdown()

    frozen = LLM(overrides=[*BASE, "scheduler.gc_freeze=true"])
    try:
        assert frozen.engine.heap_frozen
        assert gc.get_threshold() == (*thresholds[:2], max(thresholds[2], FROZEN_FULL_EVERY))
        assert gc.get_freeze_count() > 10_000  # torch, the model, the engine: all skipped by collections
        assert frozen.engine.stats.gc_full_collections == 0  # the freeze's own collection is not counted
        got = [o.outputs[0].token_ids for o in frozen.generate(PROMPTS, GREEDY)]
        assert got == want
        gc.collect()
        frozen.engine.step()  # the gauges refresh at the end of a step
        assert frozen.engine.stats.gc_full_collections >= 1
        assert frozen.engine.stats.gc_pause_seconds > 0.0
    finally:
        frozen.shutdown()
    assert not frozen.engine.heap_frozen and gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
