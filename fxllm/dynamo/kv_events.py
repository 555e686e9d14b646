"""fxllm's prefix-cache changes and load, published to Dynamo: KV events for the KV router, snapshots
for the `dynamo_component_*` gauges, and `fxllm:` Prometheus gauges for the worker's /metrics.

The engine thread only queues news (KVCacheObserver); one publisher thread drains the queue into
Dynamo's KvEventPublisher, so a slow event plane never stalls a step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxllm.runtime.engine import Engine


logger = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.25  # how often load snapshots go out when no KV event is pending


def block_hash_i64(digest: bytes) -> int:
    """Dynamo's signed 64-bit block hash for one of fxllm's sha256 block digests (its first 8 bytes).

    The router hashes the token ids itself to match prompts; this id only links a block to its parent
    and names it in removals, so 64 bits of a sha256 are plenty.
    """
    return int.from_bytes(digest[:8], "little", signed=True)


@dataclass(frozen=True)
class StoredEvent:
    """Consecutive blocks that entered the prefix cache, in Dynamo's publish_stored arguments."""

    token_ids: list[int]
    num_block_tokens: list[int]
    block_hashes: list[int]
    parent_hash: int | None


@dataclass(frozen=True)
class RemovedEvent:
    """Blocks that left the prefix cache."""

    block_hashes: list[int]


class KVEventQueue:
    """A KVCacheObserver that turns index changes into Dynamo events on a thread-safe queue."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[StoredEvent | RemovedEvent] = queue.SimpleQueue()
        self._live: set[int] = set()  # hashes announced and not yet removed, for cache_cleared
        self._lock = threading.Lock()

    def blocks_stored(self, parent_hash: bytes | None, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        """Queue one stored event for a run of newly indexed blocks."""
        hashes = [block_hash_i64(digest) for digest, _ in blocks]
        tokens = [t for _, block in blocks for t in block]
        parent = None if parent_hash is None else block_hash_i64(parent_hash)
        with self._lock:
            self._live.update(hashes)
        self.events.put(StoredEvent(tokens, [len(block) for _, block in blocks], hashes, parent))

    def blocks_removed(self, block_hashes: list[bytes]) -> None:
        """Queue one removed event."""
        hashes = [block_hash_i64(digest) for digest in block_hashes]
        with self._lock:
            self._live.difference_update(hashes)
        self.events.put(RemovedEvent(hashes))

    def cache_cleared(self) -> None:
        """Queue the removal of every announced block."""
        with self._lock:
            hashes, self._live = sorted(self._live), set()
        if hashes:
            self.events.put(RemovedEvent(hashes))


@dataclass(frozen=True)
class LoadSnapshot:
    """The worker's load, read from the engine's counters (no lock: each field is one attribute read)."""

    num_running: int
    num_waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    kv_usage: float
    prefix_hit_rate: float | None  # None before any prompt was looked up
    prefix_hit_tokens: int
    prefix_queried_tokens: int
    num_requests: int  # requests received since the warm-up

    @classmethod
    def of(cls, engine: Engine) -> LoadSnapshot:
        """Read `engine`'s scheduler and KV manager now."""
        kv = engine.kv_cache.stats
        return cls(
            num_running=engine.scheduler.num_running,
            num_waiting=engine.scheduler.num_waiting,
            kv_used_blocks=kv.num_used_blocks,
            kv_total_blocks=kv.num_blocks,
            kv_usage=kv.usage,
            prefix_hit_rate=kv.hit_rate if kv.num_queried_tokens else None,
            prefix_hit_tokens=kv.num_hit_tokens,
            prefix_queried_tokens=kv.num_queried_tokens,
            num_requests=engine.stats.num_requests,
        )


class EventPublisherThread:
    """Drains a KVEventQueue into Dynamo's KvEventPublisher and pushes load snapshots between events."""

    def __init__(self, events: KVEventQueue, load: Callable[[], LoadSnapshot]) -> None:
        self.events = events
        self.load = load
        self.snapshot_publisher: Any = None  # Dynamo's SnapshotPublisher, attached by the worker
        self.num_published = 0
        self.num_dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, kv_publisher: Any) -> None:
        """Start publishing to `kv_publisher` (Dynamo's KvEventPublisher; PushSource's on_ready)."""
        if self._thread is not None:
            raise RuntimeError("the KV event publisher thread is already running")
        self._thread = threading.Thread(
            target=self._run, args=(kv_publisher,), name="fxllm-dynamo-kv-events", daemon=True
        )
        self._thread.start()

    def start_snapshots_only(self) -> None:
        """Publish load snapshots without KV events (KV routing off or no KV event source)."""
        self.start(None)

    def stop(self) -> None:
        """Stop the thread (idempotent); events still queued are dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, kv_publisher: Any) -> None:
        while not self._stop.is_set():
            try:
                event = self.events.events.get(timeout=SNAPSHOT_INTERVAL_S)
            except queue.Empty:
                self._publish_snapshot()
                continue
            if kv_publisher is not None:
                self._publish_event(kv_publisher, event)

    def _publish_event(self, kv_publisher: Any, event: StoredEvent | RemovedEvent) -> None:
        try:
            if isinstance(event, StoredEvent):
                kv_publisher.publish_stored(
                    token_ids=event.token_ids,
                    num_block_tokens=event.num_block_tokens,
                    block_hashes=event.block_hashes,
                    parent_hash=event.parent_hash,
                )
            else:
                kv_publisher.publish_removed(block_hashes=event.block_hashes)
            self.num_published += 1
        except Exception:
            # A lost event makes the router's view stale until the block is evicted; count and go on.
            self.num_dropped += 1
            logger.exception("dropped a KV event (%d dropped so far)", self.num_dropped)

    def _publish_snapshot(self) -> None:
        if self.snapshot_publisher is None:
            return
        from dynamo.common.backend.publisher import ComponentSnapshot

        load = self.load()
        snapshot = ComponentSnapshot(
            kv_used_blocks=load.kv_used_blocks,
            kv_total_blocks=load.kv_total_blocks,
            gpu_cache_usage=load.kv_usage,
            dp_rank=0,
            kv_cache_hit_rate=load.prefix_hit_rate,
        )
        try:
            self.snapshot_publisher.publish(0, snapshot)
        except Exception:
            logger.exception("could not publish a load snapshot")


class FxllmLoadCollector:
    """A prometheus_client collector of the worker's load as `fxllm:` gauges, read at scrape time."""

    def __init__(self, load: Callable[[], LoadSnapshot]) -> None:
        self.load = load

    def collect(self) -> Iterable[Any]:
        """One gauge family per load field."""
        from prometheus_client.core import GaugeMetricFamily

        load = self.load()
        values = {
            "num_requests_running": ("requests running", load.num_running),
            "num_requests_waiting": ("requests waiting", load.num_waiting),
            "kv_cache_usage_perc": ("fraction of KV blocks in use", load.kv_usage),
            "prefix_cache_hit_rate": (
                "prompt tokens served from the prefix cache / looked up",
                load.prefix_hit_rate or 0.0,
            ),
            "prefix_cache_hit_tokens": ("prompt tokens served from the prefix cache", load.prefix_hit_tokens),
            "prefix_cache_queried_tokens": (
                "prompt tokens looked up in the prefix cache",
                load.prefix_queried_tokens,
            ),
        }
        values["requests_received"] = ("requests received since start-up", load.num_requests)
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(f"fxllm:{name}", doc, value=float(value))
