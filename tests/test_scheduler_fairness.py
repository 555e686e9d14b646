"""Admission fairness: waiting sequences are admitted round-robin across fairness groups (HTTP requests)."""

from __future__ import annotations

from fxllm.runtime.kv_cache_manager import KVCacheManager
from fxllm.runtime.scheduler import CapacityScheduler, SchedulerConfig, create_scheduler
from fxllm.runtime.sequence import Sequence, SequenceStatus


def _scheduler(max_num_seqs: int) -> CapacityScheduler:
    kv = KVCacheManager(256, 4, enable_prefix_caching=False)
    return create_scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=512), kv)


def _add(sched: CapacityScheduler, groups: dict[int, str], group: str, count: int) -> list[Sequence]:
    seqs = []
    for _ in range(count):
        seq_id = len(groups)
        seq = Sequence(seq_id, list(range(8)), 8, 4, arrival_time=float(seq_id))
        groups[seq_id] = group
        sched.add_sequence(seq)
        seqs.append(seq)
    return seqs


def _admitted(sched: CapacityScheduler) -> list[int]:
    """Run one step as the engine would; the ids of the sequences it admitted from the waiting queue."""
    running = {s.seq_id for s in sched.running}
    scheduled = sched.schedule().scheduled
    for item in scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_uncomputed_tokens == 0:
            item.seq.append_token(0)
    return [s.seq.seq_id for s in scheduled if s.seq.seq_id not in running]


def _finish(sched: CapacityScheduler, seq: Sequence) -> None:
    seq.status = SequenceStatus.FINISHED_STOPPED
    sched.finish_sequence(seq)


def test_a_late_request_gets_the_next_free_slot_not_the_back_of_a_batch() -> None:
    sched = _scheduler(max_num_seqs=2)
    groups: dict[int, str] = {}
    sched.fairness_key = lambda seq: groups[seq.seq_id]
    batch = _add(sched, groups, "batch", 6)
    assert _admitted(sched) == [0, 1]
    (late,) = _add(sched, groups, "interactive", 1)
    _finish(sched, batch[0])
    # FCFS by sequence would admit batch[2] here and the late request only after all six.
    assert _admitted(sched) == [late.seq_id]
    _finish(sched, batch[1])
    assert _admitted(sched) == [2]


def test_round_robin_across_groups_fcfs_within_each() -> None:
    sched = _scheduler(max_num_seqs=9)
    groups: dict[int, str] = {}
    sched.fairness_key = lambda seq: groups[seq.seq_id]
    a = _add(sched, groups, "a", 4)
    b = _add(sched, groups, "b", 2)
    c = _add(sched, groups, "c", 3)
    order = [s.seq_id for s in sched.admission_order(list(sched.waiting))]
    ids = [[s.seq_id for s in g] for g in (a, b, c)]
    assert order == [ids[0][0], ids[1][0], ids[2][0], ids[0][1], ids[1][1], ids[2][1], ids[0][2], ids[2][2],
                     ids[0][3]]  # fmt: skip
    assert _admitted(sched) == order


def test_default_key_is_fcfs_and_on_admit_sees_each_sequence_once() -> None:
    sched = _scheduler(max_num_seqs=2)
    seen: list[int] = []
    sched.on_admit = lambda seq: seen.append(seq.seq_id)
    seqs = [Sequence(i, list(range(8)), 8, 4, arrival_time=float(10 - i)) for i in range(3)]
    for seq in seqs:
        sched.add_sequence(seq)
    assert _admitted(sched) == [2, 1]  # earliest arrival first
    sched._preempt(seqs[1])  # a resumed sequence is not a new admission
    assert _admitted(sched) == [1]
    assert seen == [2, 1]
