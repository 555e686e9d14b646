"""Fewer full garbage collections while `fxllm serve` starts (issue 13).

A start allocates millions of objects that live as long as the process: torch's, Inductor's and
transformers' modules, the graph, the tokenizer. CPython's default thresholds (700, 10, 10) walk them all
in about eight full collections (SmolLM2's warm start on the 2-core box: 0.8 s of 1.1 s spent collecting,
of ~12.5 s). Higher thresholds for the start keep the young collections, which free the start's short-lived
cycles, and leave out the full ones; the defaults come back before the server takes requests.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

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
