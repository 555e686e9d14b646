"""Capacity scheduler: picks which sequences run each step under token, sequence and KV-block limits."""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import ClassVar

from fxllm.runtime.kv_cache_manager import KVCacheManager
from fxllm.runtime.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Scheduler limits and policy name."""

    policy: str = "max_utilization"
    # None = from the device and the KV pool (`resolve_scheduler_limits`): 64 on the CPU; on CUDA as
    # many sequences as the pool holds at AUTO_TOKENS_PER_SEQ tokens each, between 256 and 1024.
    max_num_seqs: int | None = None
    # Tokens of one step (prefill chunks plus decodes). None = 2048 on the CPU; CUDA 16384 offline, 8192 serving.
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    # Launch step N+1 before reading step N's sampled ids (host work overlaps the device's); None = on for
    # CUDA, off on the CPU, where the forward runs on the same cores and there is nothing to overlap with.
    async_scheduling: bool | None = None
    # Freeze the Python heap after the engine build (gc.freeze; runtime/gc_heap.py), so that full garbage
    # collections skip the start-up objects, and space out the full collections left (one per 100 middle
    # ones); None = on for CUDA, off on the CPU. Undone at shutdown.
    gc_freeze: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1.")


CPU_MAX_NUM_SEQS, CPU_MAX_BATCHED_TOKENS = 64, 2048
CUDA_MAX_NUM_SEQS, CUDA_MIN_NUM_SEQS = 1024, 256
# Offline 16384 (8B FP8 1,000 x 128/128 +1.2% on an H200, RESULTS.md nineteenth session), serving 8192 (a
# step's prefill chunk delays every decode in it): vLLM's values for its LLM class and API server.
CUDA_MAX_BATCHED_TOKENS, CUDA_SERVING_BATCHED_TOKENS = 16384, 8192
# A pool of N tokens runs N / 256 sequences without preempting when they average 256 tokens; more
# would trade throughput for preemptions (issue 14's 128 x 2048-token case preempted at a fixed 256).
AUTO_TOKENS_PER_SEQ = 256


def resolve_scheduler_limits(
    config: SchedulerConfig, device_type: str, capacity_tokens: int | None = None, serving: bool = False
) -> SchedulerConfig:
    """`config` with its automatic (None) limits set for the device, the pool and `serving` (a server's)."""
    seqs, tokens = config.max_num_seqs, config.max_num_batched_tokens
    if device_type == "cuda":
        if seqs is None:
            by_pool = (capacity_tokens or 0) // AUTO_TOKENS_PER_SEQ
            seqs = max(CUDA_MIN_NUM_SEQS, min(CUDA_MAX_NUM_SEQS, by_pool))
        if tokens is None:
            tokens = CUDA_SERVING_BATCHED_TOKENS if serving else CUDA_MAX_BATCHED_TOKENS
    else:
        seqs = CPU_MAX_NUM_SEQS if seqs is None else seqs
        tokens = CPU_MAX_BATCHED_TOKENS if tokens is None else tokens
    return dataclasses.replace(config, max_num_seqs=seqs, max_num_batched_tokens=tokens)


@dataclass
class ScheduledSequence:
    """A sequence and how many tokens to compute for it this step, starting at seq.num_computed_tokens."""

    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    """One step's work: scheduled sequences (decodes first, then prefills) and those preempted."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Total tokens in the flat batch."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to run."""
        return not self.scheduled


def by_sequence(seq: Sequence) -> Hashable:
    """The default fairness key: every sequence is its own group, so admission is FCFS by sequence."""
    return seq.seq_id


class CapacityScheduler:
    """Fair-share scheduler with chunked prefill and recompute preemption; subclass and override the hooks.

    Waiting sequences are admitted by fair share across fairness groups (`fairness_key`; the server makes
    each HTTP request one group): the group with the fewest running sequences first, round-robin among
    equals, FCFS within a group. So one request with many sequences cannot make another wait for all of
    them. With the default key (one group per sequence) this is plain FCFS.
    """

    name: ClassVar[str] = ""
    # If False, a failed block allocation for a running sequence is a bug (the policy reserved capacity).
    allow_preemption: ClassVar[bool] = True

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        # The engine builder resolves automatic limits for its device; a scheduler made directly gets the CPU's.
        self.config = resolve_scheduler_limits(config, "cpu")
        self.kv_cache = kv_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seqs: dict[int, Sequence] = {}
        # Set by the scheduler's owner (the server): the fairness group of a sequence, and a callback run
        # when a waiting sequence is first admitted (the server's queue-time metric). Both run on the engine
        # thread inside schedule().
        self.fairness_key: Callable[[Sequence], Hashable] = by_sequence
        self.on_admit: Callable[[Sequence], None] | None = None
        # Groups with waiting sequences in turn order: a group moves to the back when one of its sequences
        # is admitted, and a new group joins at the back, so every group gets a turn in each round.
        self._turns: OrderedDict[Hashable, None] = OrderedDict()

    # ------------------------------------------------------------------ queue management

    @property
    def num_waiting(self) -> int:
        """Sequences waiting (new or preempted)."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding KV blocks."""
        return len(self.running)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a new sequence; rejects ones that could never be scheduled."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"Sequence id {seq.seq_id} is already scheduled; use a unique seq_id.")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"Sequence {seq.seq_id} must be fresh (WAITING, no blocks, nothing computed).")
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
            raise ValueError(
                f"Prompt of sequence {seq.seq_id} has {seq.num_tokens} tokens > max_num_batched_tokens="
                f"{budget}; enable chunked prefill or raise max_num_batched_tokens."
            )
        max_blocks = -(-seq.max_num_tokens // self.kv_cache.block_size)
        if max_blocks > self.kv_cache.num_blocks:
            raise ValueError(
                f"Sequence {seq.seq_id} may grow to {seq.max_num_tokens} tokens ({max_blocks} blocks) but the "
                f"KV cache has {self.kv_cache.num_blocks} blocks; lower max_tokens or enlarge the cache."
            )
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort_sequence(self, seq_id: int) -> Sequence | None:
        """Remove a sequence wherever it is, free its blocks and mark it aborted; None if unknown."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._remove(seq)
        seq.status = SequenceStatus.FINISHED_ABORTED
        return seq

    def finish_sequence(self, seq: Sequence) -> None:
        """Release a sequence the engine marked finished."""
        if not seq.status.is_finished:
            raise ValueError(
                f"Sequence {seq.seq_id} has status {seq.status.name}; set a FINISHED_* status first."
            )
        if self._seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"Sequence {seq.seq_id} is not managed by this scheduler.")
        self._remove(seq)

    # ------------------------------------------------------------------ policy hooks

    def admission_order(self, waiting: list[Sequence]) -> list[Sequence]:
        """Order never-run waiting sequences (preempted ones are always resumed first): the fairness group
        holding the fewest running sequences goes first, ties in turn order (round-robin), FCFS within a group."""
        queues: dict[Hashable, deque[Sequence]] = {}
        for seq in sorted(waiting, key=lambda s: (s.arrival_time, s.seq_id)):
            queues.setdefault(self.fairness_key(seq), deque()).append(seq)
        for group in [g for g in self._turns if g not in queues]:
            del self._turns[group]
        for group in queues:  # new groups queue behind the ones already waiting, oldest first
            self._turns.setdefault(group, None)
        running = Counter(self.fairness_key(s) for s in self.running)
        # (running sequences, turn) per group; a group that gets a slot counts one more and goes to the back.
        heap = [(running[group], turn, group) for turn, group in enumerate(self._turns)]
        heapq.heapify(heap)
        order: list[Sequence] = []
        tick = len(heap)
        while heap:
            count, _, group = heapq.heappop(heap)
            queue = queues[group]
            order.append(queue.popleft())
            if queue:
                heapq.heappush(heap, (count + 1, tick, group))
                tick += 1
        return order

    def can_admit(self, seq: Sequence) -> bool:
        """Policy capacity check before admitting a waiting sequence (block availability is checked after)."""
        return True

    def select_victim(self, running: list[Sequence]) -> Sequence:
        """Pick the sequence to preempt among candidates; default the latest arrival."""
        return max(running, key=lambda s: (s.arrival_time, s.seq_id))

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running sequences first (preempting if needed), then admit waiting ones."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        done: set[int] = set()  # ids scheduled or preempted this step

        # Decodes before running prefills so a long chunked prefill cannot starve token generation.
        todo = [(s, len(s.token_ids) - s.num_computed_tokens) for s in self.running]  # tokens to compute
        decodes, prefills = [t for t in todo if t[1] == 1], [t for t in todo if t[1] > 1]
        prefill_part: list[ScheduledSequence] = []
        for group, target in ((decodes, out.scheduled), (prefills, prefill_part)):
            for seq, uncomputed in group:
                if budget <= 0:
                    break
                if seq.seq_id in done:  # preempted earlier in this step (sizes only change by preemption)
                    continue
                # A decode with drafted tokens verifies them in the same step (speculative decoding); a
                # tight budget cuts the drafts, never the known token.
                num_new = min(uncomputed + len(seq.draft_token_ids), budget)
                if self._allocate_running(seq, num_new, done, out.preempted):
                    target.append(ScheduledSequence(seq, num_new))
                    done.add(seq.seq_id)
                    budget -= num_new

        # After a preemption memory is tight; admitting new work now would only cause more preemptions.
        if not out.preempted:
            budget = self._admit_waiting(budget, prefill_part)
        out.scheduled.extend(prefill_part)
        return out

    def _allocate_running(
        self, seq: Sequence, num_new: int, done: set[int], preempted: list[Sequence]
    ) -> bool:
        """Allocate blocks for a running sequence, preempting victims until it fits or is itself preempted."""
        while not self.kv_cache.allocate(seq, num_new):
            if not self.allow_preemption:
                raise RuntimeError(
                    f"Policy {self.name!r} could not allocate blocks for running sequence {seq.seq_id}; "
                    "its capacity reservation is wrong."
                )
            candidates = [s for s in self.running if s.seq_id not in done]
            victim = self.select_victim(candidates)
            if victim not in candidates:
                raise RuntimeError(f"select_victim returned sequence {victim.seq_id}, not a candidate.")
            self._preempt(victim)
            done.add(victim.seq_id)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        """Admit waiting sequences head-of-line until one does not fit; returns the remaining budget."""
        if budget <= 0 or len(self.running) >= self.config.max_num_seqs or not self.waiting:
            return budget  # nothing can be admitted: skip ordering the whole queue every decode step
        resumed = [s for s in self.waiting if s.status is SequenceStatus.PREEMPTED]
        fresh = [s for s in self.waiting if s.status is not SequenceStatus.PREEMPTED]
        ordered = resumed + self.admission_order(fresh)
        if len(ordered) != len(self.waiting):
            raise RuntimeError("admission_order must return a permutation of the waiting list.")
        admitted: set[int] = set()
        for seq in ordered:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not self.can_admit(seq):
                break
            remaining = seq.num_tokens - self.kv_cache.lookup_prefix(seq)
            if self.config.enable_chunked_prefill:
                request = min(remaining, budget)
            elif remaining <= budget:
                request = remaining
            else:
                break
            if not self.kv_cache.allocate(seq, request):
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if seq.status is SequenceStatus.WAITING:
                self._took_turn(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.add(seq.seq_id)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        if admitted:
            self.waiting = deque(s for s in self.waiting if s.seq_id not in admitted)
        return budget

    def _took_turn(self, seq: Sequence) -> None:
        """A never-run sequence is admitted: its group goes to the back of the turns; tell the owner."""
        group = self.fairness_key(seq)
        if group in self._turns:
            self._turns.move_to_end(group)
        if self.on_admit is not None:
            self.on_admit(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence for recomputation and put it at the front of the waiting queue."""
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        logger.debug("Preempted sequence %d (%d tokens) for recompute.", seq.seq_id, seq.num_tokens)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
        self._seqs.pop(seq.seq_id, None)


_REGISTRY: dict[str, type[CapacityScheduler]] = {}


def register_scheduler(name: str) -> Callable[[type[CapacityScheduler]], type[CapacityScheduler]]:
    """Class decorator registering a CapacityScheduler subclass under name (unique)."""

    def decorator(cls: type[CapacityScheduler]) -> type[CapacityScheduler]:
        if not (isinstance(cls, type) and issubclass(cls, CapacityScheduler)):
            raise TypeError(f"@register_scheduler({name!r}) must decorate a CapacityScheduler subclass.")
        if name in _REGISTRY:
            raise ValueError(
                f"Scheduler policy {name!r} is already registered by {_REGISTRY[name].__qualname__}; "
                "choose another name."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_scheduler_class(name: str) -> type[CapacityScheduler]:
    """Look up a registered policy by name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(
            f"Unknown scheduler policy {name!r}; known policies: {known}. "
            "Register custom ones with @register_scheduler."
        ) from None


def create_scheduler(config: SchedulerConfig, kv_cache: KVCacheManager) -> CapacityScheduler:
    """Instantiate the policy named by config.policy."""
    return get_scheduler_class(config.policy)(config, kv_cache)


@register_scheduler("max_utilization")
class MaxUtilizationScheduler(CapacityScheduler):
    """Admit whenever blocks are free now; preempt (recompute) the latest arrival when memory runs out."""


@register_scheduler("guaranteed_no_evict")
class GuaranteedNoEvictScheduler(CapacityScheduler):
    """Admit only if every running sequence can reach its maximum length; never preempts."""

    allow_preemption: ClassVar[bool] = False

    def can_admit(self, seq: Sequence) -> bool:
        """Check that seq's worst case fits in the free blocks not reserved by running sequences."""
        kv = self.kv_cache
        reserved = sum(kv.blocks_needed(s, s.max_num_tokens - s.num_computed_tokens) for s in self.running)
        hits = kv.prefix_hit_blocks(seq)
        # Hits on blocks another sequence holds cost nothing; evictable hits leave the free pool like fresh ones.
        num_shared_hits = sum(1 for b in hits if kv.ref_count(b) > 0)
        need = -(-seq.max_num_tokens // kv.block_size) - num_shared_hits
        return need + reserved <= kv.num_free_blocks
