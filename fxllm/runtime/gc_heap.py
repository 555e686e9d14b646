"""Python garbage collection around the engine: pauses measured, the start-up heap frozen on CUDA, fewer
full collections while `fxllm serve` starts.

A full (generation 2) collection walks every tracked object of the process. After an engine is built that
is millions of them (FX graphs, Inductor's generated modules, tokenizer tables), so one full collection
stops the host for a large fraction of a second, during which the GPU, fed step by step by this host, idles
(H200, FP8 1,000 x 128/128: two full collections paused the host 0.64 s and left the GPU idle 259 and 230
ms; with the heap frozen the longest gap was 25 ms, benchmarks/RESULTS.md thirteenth session). vLLM and SGLang
freeze the heap after start-up (`gc.freeze()`): what exists then moves to a permanent generation that
collections skip. fxllm does the same at the end of an engine build (`scheduler.gc_freeze`, default on for
CUDA), spaces out the full collections that remain (FROZEN_FULL_EVERY), and undoes both in `unfreeze_heap()`
at shutdown, so that a process building many engines (the tests) does not keep the garbage of earlier ones
forever. The pause meter counts collections and their seconds per generation for EngineStats, with or
without freezing, so a profile's gap can be checked against it.

Start-up (issue 13): a start allocates millions of objects that live as long as the process: torch's,
Inductor's and transformers' modules, the graph, the tokenizer. CPython's default thresholds (700, 10, 10)
walk them all in about eight full collections (SmolLM2's warm start on the 2-core box: 0.8 s of 1.1 s spent
collecting, of ~12.5 s). `startup_gc()` raises the thresholds for the start: the young collections, which
free the start's short-lived cycles, stay; the full ones are left out; the defaults come back before the
server takes requests. This module imports nothing heavy: `python -m fxllm.serve` enters it before torch.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


class GcPauseMeter:
    """Collections and seconds spent in them per generation, from `gc.callbacks` (process-wide)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            generation = int(info.get("generation", 2))
            self.collections[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._started
            self._started = None


_METER: GcPauseMeter | None = None


def pause_meter() -> GcPauseMeter:
    """The process's pause meter, installed in `gc.callbacks` on first use."""
    global _METER
    if _METER is None:
        _METER = GcPauseMeter()
        gc.callbacks.append(_METER)
    return _METER


class GcWindow:
    """Full collections and pause seconds since the last `reset()` (an engine's stats window)."""

    def __init__(self) -> None:
        self._meter = pause_meter()
        self._base = self._totals()

    def _totals(self) -> tuple[int, float]:
        return self._meter.collections[2], sum(self._meter.seconds)

    def reset(self) -> None:
        """Start counting from now."""
        self._base = self._totals()

    def since(self) -> tuple[int, float]:
        """(full collections, seconds of all collections) since the last reset."""
        full, seconds = self._totals()
        return full - self._base[0], seconds - self._base[1]


def should_freeze(configured: bool | None, device_type: str) -> bool:
    """`scheduler.gc_freeze` resolved: None = on for CUDA (a host pause idles the GPU), off elsewhere."""
    return device_type == "cuda" if configured is None else configured


# With the heap frozen, a full collection walks only what the run itself keeps alive, and CPython runs one
# when the objects promoted since the last exceed a quarter of those (and 10 middle collections have passed):
# few objects, so often. H200, FP8 8B engine: 6 full collections (0.41 s of pauses) in a 5.2 s 1,000 x 128/128
# run, 23 (1.76 s) in 512 x 1,024/1,024, while the GPU waited on the host after an LM head for up to 30 ms.
# A frozen engine asks for 100 middle collections between full ones instead of 10; young and middle
# collections, which free the steps' short-lived cycles, are unchanged.
FROZEN_FULL_EVERY = 100
_thresholds_before_freeze: tuple[int, int, int] | None = None


def freeze_heap() -> tuple[int, float]:
    """Collect, then move every surviving object to the permanent generation and space out full collections
    (FROZEN_FULL_EVERY); (objects frozen, seconds)."""
    global _thresholds_before_freeze
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    before = gc.get_threshold()
    if before[0] != 0 and _thresholds_before_freeze is None:  # 0: automatic collection is off; keep it off
        _thresholds_before_freeze = before
        gc.set_threshold(before[0], before[1], max(before[2], FROZEN_FULL_EVERY))
    frozen, seconds = gc.get_freeze_count(), time.perf_counter() - start
    logger.info("Python heap frozen after the engine build: %d objects skipped by collections from now "
                "on, a full collection every %d middle ones (%.2f s; scheduler.gc_freeze)",
                frozen, gc.get_threshold()[2], seconds)  # fmt: skip
    return frozen, seconds


def unfreeze_heap() -> None:
    """Give the collector the frozen objects and its thresholds back (the engine that froze shuts down)."""
    global _thresholds_before_freeze
    gc.unfreeze()
    if _thresholds_before_freeze is not None:
        gc.set_threshold(*_thresholds_before_freeze)
        _thresholds_before_freeze = None


# A young collection every 10,000 net allocations, a middle one every 50 of those, a full one every 100
# middle ones (~50 million allocations: none in a warm start).
STARTUP_THRESHOLDS = (10_000, 50, 100)


@contextmanager
def startup_gc() -> Iterator[None]:
    """Raise the collector's thresholds for the block (never lowering one), then restore the previous ones."""
    before = gc.get_threshold()
    if before[0] != 0:  # 0: the user turned automatic collection off; keep it off
        gc.set_threshold(*(max(new, old) for new, old in zip(STARTUP_THRESHOLDS, before)))
    try:
        yield
    finally:
        gc.set_threshold(*before)
