"""Tests for the capacity scheduler, driven through full sequence lifetimes by a fake engine."""

from __future__ import annotations

import random

import pytest

from fxllm.runtime.kv_cache_manager import KVCacheManager
from fxllm.runtime.scheduler import (
    CapacityScheduler,
    GuaranteedNoEvictScheduler,
    MaxUtilizationScheduler,
    SchedulerConfig,
    SchedulerOutput,
    create_scheduler,
    get_scheduler_class,
    register_scheduler,
)
from fxllm.runtime.sequence import Sequence, SequenceStatus


@register_scheduler("test_shortest_prompt_first")
class ShortestPromptFirst(CapacityScheduler):
    """User policy: admit the shortest prompt first."""

    def admission_order(self, waiting: list[Sequence]) -> list[Sequence]:
        """Shortest prompt first, FCFS among equals."""
        return sorted(waiting, key=lambda s: (s.num_tokens, s.arrival_time))


def gen_token(seq_id: int, index: int) -> int:
    """Deterministic 'sampled' token, so lost or duplicated tokens after preemption are detectable."""
    return 1000 * (seq_id + 1) + index


def make_seq(seq_id: int, prompt_len: int, max_tokens: int, start: int | None = None) -> Sequence:
    """Sequence with a distinct prompt (or tokens start.. when given, to share prefixes)."""
    base = 100 * seq_id if start is None else start
    return Sequence(
        seq_id=seq_id,
        token_ids=list(range(base, base + prompt_len)),
        num_prompt_tokens=prompt_len,
        max_tokens=max_tokens,
        arrival_time=float(seq_id),
    )


def expected_tokens(seq: Sequence) -> list[int]:
    """Prompt plus every token the fake engine should have sampled."""
    prompt = seq.token_ids[: seq.num_prompt_tokens]
    return prompt + [gen_token(seq.seq_id, i) for i in range(seq.max_tokens)]


def make_scheduler(
    policy: str = "max_utilization",
    num_blocks: int = 64,
    block_size: int = 4,
    prefix_caching: bool = True,
    **config: int | bool,
) -> CapacityScheduler:
    """Scheduler over a fresh KV-cache manager."""
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return create_scheduler(SchedulerConfig(policy=policy, **config), kv)  # type: ignore[arg-type]


class FakeEngine:
    """Plays the engine's part after each schedule(): advance, cache blocks, sample, finish."""

    def __init__(self, sched: CapacityScheduler) -> None:
        self.sched = sched
        self.kv = sched.kv_cache
        self.outputs: list[SchedulerOutput] = []
        self.max_running = 0

    def step(self) -> SchedulerOutput:
        """Schedule one step and simulate running it, checking invariants on the way."""
        decode_ids = {s.seq_id for s in self.sched.running if s.num_uncomputed_tokens == 1}
        out = self.sched.schedule()
        cfg = self.sched.config
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs and self.sched.num_running <= cfg.max_num_seqs
        ids = [sc.seq.seq_id for sc in out.scheduled]
        assert len(set(ids)) == len(ids)
        assert not set(ids) & {s.seq_id for s in out.preempted}
        is_decode = [i in decode_ids for i in ids]
        assert is_decode == sorted(is_decode, reverse=True), "decodes must precede prefills"
        self.max_running = max(self.max_running, self.sched.num_running)
        for sc in out.scheduled:
            seq = sc.seq
            assert seq.status is SequenceStatus.RUNNING and sc.num_new_tokens >= 1
            assert seq.num_computed_tokens + sc.num_new_tokens <= seq.num_tokens
            assert len(seq.block_table) * self.kv.block_size >= seq.num_computed_tokens + sc.num_new_tokens
            seq.num_computed_tokens += sc.num_new_tokens
            self.kv.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(gen_token(seq.seq_id, seq.num_output_tokens))
                if seq.num_output_tokens >= seq.max_tokens:
                    seq.status = SequenceStatus.FINISHED_LENGTH
                    self.sched.finish_sequence(seq)
        self.kv.check_invariants()
        self.outputs.append(out)
        return out

    def run(self, max_steps: int = 2000) -> None:
        """Step until nothing is left."""
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                assert self.kv.num_free_blocks == self.kv.num_blocks
                return
            self.step()
        raise AssertionError("scheduler did not drain")

    def chunks(self, seq: Sequence) -> list[int]:
        """num_new_tokens given to seq in each step where it was scheduled."""
        return [sc.num_new_tokens for out in self.outputs for sc in out.scheduled if sc.seq is seq]

    def seqs_at(self, step: int) -> list[Sequence]:
        """Sequences scheduled at a step, in batch order."""
        return [sc.seq for sc in self.outputs[step].scheduled]

    def first_step(self, seq: Sequence) -> int:
        """Index of the first step that scheduled seq."""
        return next(i for i, out in enumerate(self.outputs) if any(sc.seq is seq for sc in out.scheduled))


@pytest.mark.parametrize("policy", ["max_utilization", "guaranteed_no_evict"])
@pytest.mark.parametrize("chunked", [True, False])
def test_random_workload_respects_limits_and_completes(policy: str, chunked: bool) -> None:
    rng = random.Random(7)
    sched = make_scheduler(
        policy, num_blocks=20, max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=chunked
    )
    seqs = []
    for i in range(25):
        # Some shared starts so prefix hits also happen under scheduling.
        start = 0 if rng.random() < 0.4 else None
        seqs.append(make_seq(i, rng.randint(1, 40 if chunked else 16), rng.randint(1, 12), start))
        sched.add_sequence(seqs[-1])
    engine = FakeEngine(sched)
    engine.run()
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED_LENGTH
        assert seq.token_ids == expected_tokens(seq)
    if policy == "guaranteed_no_evict":
        assert all(not out.preempted for out in engine.outputs)
    assert sched.kv_cache.stats.num_hit_tokens > 0


def test_chunked_prefill_splits_long_prompt_while_others_decode() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a, b = make_seq(0, 3, max_tokens=20), make_seq(1, 30, max_tokens=2)
    sched.add_sequence(a)
    sched.add_sequence(b)
    engine = FakeEngine(sched)
    for _ in range(6):
        engine.step()
    assert engine.chunks(b) == [5, 7, 7, 7, 4, 1]
    assert engine.chunks(a) == [3, 1, 1, 1, 1, 1]
    assert all(out.scheduled[0].seq is a for out in engine.outputs)
    assert b.status is SequenceStatus.FINISHED_LENGTH
    engine.run()
    assert a.token_ids == expected_tokens(a)


def test_without_chunked_prefill_whole_prompt_must_fit_and_head_of_line_blocks() -> None:
    sched = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="enable chunked prefill"):
        sched.add_sequence(make_seq(9, 11, max_tokens=1))
    a, b, c = make_seq(0, 6, 3), make_seq(1, 6, 3), make_seq(2, 2, 3)
    for seq in (a, b, c):
        sched.add_sequence(seq)
    engine = FakeEngine(sched)
    first = engine.step()
    # c would fit the 4 leftover tokens but must not overtake b.
    assert [(sc.seq, sc.num_new_tokens) for sc in first.scheduled] == [(a, 6)]
    second = engine.step()
    assert [(sc.seq, sc.num_new_tokens) for sc in second.scheduled] == [(a, 1), (b, 6), (c, 2)]
    engine.run()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_max_utilization_preempts_latest_arrival_and_recomputes(prefix_caching: bool) -> None:
    sched = make_scheduler(num_blocks=6, prefix_caching=prefix_caching, max_num_seqs=3)
    assert isinstance(sched, MaxUtilizationScheduler)
    seqs = [make_seq(i, 4, max_tokens=8) for i in range(4)]  # each grows to 3 blocks; 3 running need 9
    for seq in seqs:
        sched.add_sequence(seq)
    a, b, c, d = seqs
    engine = FakeEngine(sched)
    while not any(out.preempted for out in engine.outputs):
        engine.step()
    out = engine.outputs[-1]
    assert out.preempted == [c]
    assert [sc.seq for sc in out.scheduled] == [a, b]
    assert c.status is SequenceStatus.PREEMPTED and c.block_table == []
    assert c.num_computed_tokens == 0 and c.num_cached_tokens == 0
    assert list(sched.waiting) == [c, d]
    assert c.num_output_tokens == 5  # generated tokens survive preemption
    preempt_step = len(engine.outputs) - 1
    engine.run()
    assert [s for out in engine.outputs for s in out.preempted] == [c]
    # Requeued at the front: c resumes no later than d, and ahead of it in the batch.
    resume = next(i for i in range(preempt_step + 1, len(engine.outputs)) if c in engine.seqs_at(i))
    d_first = engine.first_step(d)
    assert resume < d_first or engine.seqs_at(resume).index(c) < engine.seqs_at(resume).index(d)
    recompute = next(sc for sc in engine.outputs[resume].scheduled if sc.seq is c)
    assert recompute.num_new_tokens == 9 - c.num_cached_tokens  # prompt + 5 outputs, minus prefix hits
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED_LENGTH
        assert seq.token_ids == expected_tokens(seq)


def test_running_sequence_preempts_itself_when_it_is_the_latest_arrival() -> None:
    sched = make_scheduler(num_blocks=3)
    a, b = make_seq(0, 4, max_tokens=8), make_seq(1, 4, max_tokens=8)
    sched.add_sequence(a)
    sched.add_sequence(b)
    engine = FakeEngine(sched)
    engine.step()
    out = engine.step()  # both need a second block, only one is free
    assert [sc.seq for sc in out.scheduled] == [a]
    assert out.preempted == [b] and b.status is SequenceStatus.PREEMPTED
    engine.run()
    assert a.token_ids == expected_tokens(a) and b.token_ids == expected_tokens(b)


def test_guaranteed_no_evict_reserves_worst_case_and_never_preempts() -> None:
    sched = make_scheduler("guaranteed_no_evict", num_blocks=6, max_num_seqs=3)
    assert isinstance(sched, GuaranteedNoEvictScheduler)
    seqs = [make_seq(i, 4, max_tokens=8) for i in range(4)]
    for seq in seqs:
        sched.add_sequence(seq)
    engine = FakeEngine(sched)
    first = engine.step()
    assert [sc.seq for sc in first.scheduled] == seqs[:2]  # 3 blocks each at most -> only 2 fit
    engine.run()
    assert engine.max_running == 2
    assert all(not out.preempted for out in engine.outputs)
    for seq in seqs:
        assert seq.token_ids == expected_tokens(seq)


def test_user_policy_registered_by_name_changes_admission_order() -> None:
    def admission(policy: str) -> list[int]:
        sched = make_scheduler(policy, max_num_seqs=1)
        seqs = [make_seq(0, 10, 2), make_seq(1, 2, 2), make_seq(2, 5, 2)]
        for seq in seqs:
            sched.add_sequence(seq)
        engine = FakeEngine(sched)
        engine.run()
        return sorted(range(3), key=lambda i: engine.first_step(seqs[i]))

    assert get_scheduler_class("test_shortest_prompt_first") is ShortestPromptFirst
    assert isinstance(make_scheduler("test_shortest_prompt_first"), ShortestPromptFirst)
    assert admission("max_utilization") == [0, 1, 2]
    assert admission("test_shortest_prompt_first") == [1, 2, 0]


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="Unknown scheduler policy 'nope'") as err:
        create_scheduler(SchedulerConfig(policy="nope"), KVCacheManager(4, 4))
    assert "max_utilization" in str(err.value) and "guaranteed_no_evict" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_scheduler("max_utilization")(type("Dup", (CapacityScheduler,), {}))
    with pytest.raises(TypeError, match="CapacityScheduler subclass"):
        register_scheduler("not_a_scheduler")(int)  # type: ignore[arg-type]
    assert get_scheduler_class("max_utilization") is MaxUtilizationScheduler


def test_abort_frees_blocks_and_removes_from_queues() -> None:
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    a, b = make_seq(0, 9, 4), make_seq(1, 3, 4)
    sched.add_sequence(a)
    sched.add_sequence(b)
    FakeEngine(sched).step()
    kv = sched.kv_cache
    assert kv.num_free_blocks == 5 and sched.num_running == 1 and sched.num_waiting == 1
    assert sched.abort_sequence(0) is a
    assert a.status is SequenceStatus.FINISHED_ABORTED and a.block_table == []
    assert kv.num_free_blocks == 8 and sched.num_running == 0
    assert sched.abort_sequence(1) is b and sched.num_waiting == 0
    assert sched.abort_sequence(42) is None
    assert not sched.has_unfinished() and sched.schedule().is_empty


def test_argument_validation() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    seq = make_seq(0, 4, 4)
    sched.add_sequence(seq)
    with pytest.raises(ValueError, match="unique seq_id"):
        sched.add_sequence(make_seq(0, 4, 4))
    with pytest.raises(ValueError, match="lower max_tokens or enlarge the cache"):
        sched.add_sequence(make_seq(1, 10, 7))
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish_sequence(seq)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


def test_automatic_limits_follow_the_device_and_the_pool() -> None:
    from fxllm.runtime.scheduler import resolve_scheduler_limits

    auto = SchedulerConfig()
    cpu = resolve_scheduler_limits(auto, "cpu", 10**6)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (64, 2048)
    # CUDA: the pool's tokens / 256, kept between 256 and 1024.
    assert resolve_scheduler_limits(auto, "cuda", 400_000).max_num_seqs == 1024
    assert resolve_scheduler_limits(auto, "cuda", 128 * 1024).max_num_seqs == 512
    assert resolve_scheduler_limits(auto, "cuda", 10_000).max_num_seqs == 256
    # Tokens a step on CUDA: 16384 offline, 8192 behind a server (a big prefill chunk delays decodes).
    assert resolve_scheduler_limits(auto, "cuda", 400_000).max_num_batched_tokens == 16384
    assert resolve_scheduler_limits(auto, "cuda", 400_000, serving=True).max_num_batched_tokens == 8192
    assert resolve_scheduler_limits(auto, "cpu", 400_000, serving=True).max_num_batched_tokens == 2048
    explicit = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512)
    assert resolve_scheduler_limits(explicit, "cuda", 400_000) == explicit
    # A scheduler built directly (no device known) runs with the CPU's limits.
    assert create_scheduler(auto, KVCacheManager(4, 4)).config.max_num_seqs == 64
