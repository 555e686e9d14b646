"""Tests for the paged KV-cache block manager and its prefix cache."""

from __future__ import annotations

import random

import pytest

import fxllm.runtime.kv_cache_manager as kv_module
from fxllm.runtime.kv_cache_manager import KVCacheManager
from fxllm.runtime.sequence import Sequence, SequenceStatus

BS = 4


def make_seq(seq_id: int, tokens: list[int], max_tokens: int = 8) -> Sequence:
    """Fresh sequence whose prompt is tokens."""
    return Sequence(
        seq_id=seq_id,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        max_tokens=max_tokens,
        arrival_time=float(seq_id),
    )


def run_prefill(kv: KVCacheManager, seq: Sequence) -> None:
    """Allocate and 'compute' the whole remaining prompt, registering full blocks like the engine does."""
    assert kv.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)


def test_sequence_helpers_and_validation() -> None:
    seq = make_seq(0, [1, 2, 3])
    seq.append_token(9)
    assert (seq.num_tokens, seq.num_output_tokens, seq.output_token_ids, seq.last_token_id) == (4, 1, [9], 9)
    assert seq.num_uncomputed_tokens == 4 and seq.max_num_tokens == 11
    assert SequenceStatus.FINISHED_LENGTH.is_finished and not SequenceStatus.PREEMPTED.is_finished
    with pytest.raises(ValueError, match="non-empty prompt"):
        make_seq(1, [])
    with pytest.raises(ValueError, match="max_tokens"):
        make_seq(1, [1], max_tokens=0)


def test_constructor_and_argument_errors() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0, BS)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)
    kv = KVCacheManager(4, BS)
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate(make_seq(0, [1, 2]), -1)
    stale = make_seq(1, [1, 2, 3])
    stale.num_computed_tokens = 3  # freed but never reset
    with pytest.raises(ValueError, match="reset num_computed_tokens"):
        kv.allocate(stale, 1)


def test_prefix_reuse_three_shared_blocks() -> None:
    kv = KVCacheManager(16, BS)
    prefix = list(range(100, 100 + 3 * BS))
    a = make_seq(0, [*prefix, 1, 2])
    run_prefill(kv, a)
    assert a.num_cached_tokens == 0 and len(a.block_table) == 4

    b = make_seq(1, [*prefix, 7, 8, 9])
    assert kv.lookup_prefix(b) == 3 * BS
    assert kv.allocate(b, b.num_tokens)
    assert b.num_cached_tokens == 3 * BS and b.num_computed_tokens == 3 * BS
    assert b.num_uncomputed_tokens == 3
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert [kv.ref_count(blk) for blk in a.block_table] == [2, 2, 2, 1]
    assert kv.ref_count(b.block_table[3]) == 1

    stats = kv.stats
    assert stats.num_queried_tokens == a.num_tokens + b.num_tokens
    assert stats.num_hit_tokens == 3 * BS
    assert stats.hit_rate == pytest.approx(12 / 29)
    assert stats.num_used_blocks == 5 and stats.usage == pytest.approx(5 / 16)


def test_prefix_hash_is_not_pythons_tuple_hash() -> None:
    # hash() reduces ints modulo 2**61 - 1, so these two blocks had the same chained tuple hash and the
    # second prompt was served the first one's KV (GHSA-rm76-4mrf-v9r8 in vLLM).
    mersenne = 2**61 - 1
    assert hash((None, (0, 1, 2, 3))) == hash((None, (mersenne, 1, 2, 3)))
    kv = KVCacheManager(8, BS)
    run_prefill(kv, make_seq(0, [0, 1, 2, 3, 4]))
    crafted = make_seq(1, [mersenne, 1, 2, 3, 4])
    assert kv.lookup_prefix(crafted) == 0
    assert kv.allocate(crafted, crafted.num_tokens) and crafted.num_cached_tokens == 0
    digest = kv_module._hash_block(None, [0, 1, 2, 3])
    assert isinstance(digest, bytes) and len(digest) == 32
    assert digest != kv_module._hash_block(None, [mersenne, 1, 2, 3])
    assert kv_module._hash_block(digest, [4]) != kv_module._hash_block(None, [4])  # chained on the parent


def test_forced_digest_collision_never_reuses_other_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every block gets the same digest: only the token comparison on a hit stands between a prompt
    # and another user's KV.
    monkeypatch.setattr(kv_module, "_hash_block", lambda parent, tokens: b"\0" * 32)
    kv = KVCacheManager(16, BS)
    victim = make_seq(0, [10, 11, 12, 13, 14, 15, 16, 17, 18])
    run_prefill(kv, victim)
    attacker = make_seq(1, [90, 91, 92, 93, 94, 95, 96, 97, 98])
    assert kv.lookup_prefix(attacker) == 0
    assert kv.allocate(attacker, attacker.num_tokens)
    assert attacker.num_cached_tokens == 0 and not set(attacker.block_table) & set(victim.block_table)
    # The same first block is still shared; the second (same digest, other tokens) is not.
    same_head = make_seq(2, [10, 11, 12, 13, 50, 51, 52, 53, 54])
    assert kv.prefix_hit_blocks(same_head) == victim.block_table[:1]
    kv.check_invariants()


def test_last_prompt_token_is_never_a_hit() -> None:
    kv = KVCacheManager(16, BS)
    two_blocks = list(range(2 * BS))
    run_prefill(kv, make_seq(0, two_blocks))

    # Exactly two full blocks: reusing both would leave nothing to compute, so only one is reused.
    same = make_seq(1, two_blocks)
    assert kv.allocate(same, same.num_tokens)
    assert same.num_cached_tokens == BS and same.num_uncomputed_tokens == BS
    assert len(same.block_table) == 2

    # One extra token: both full blocks are reusable and exactly one token remains.
    longer = make_seq(2, [*two_blocks, 99])
    assert kv.allocate(longer, longer.num_tokens)
    assert longer.num_cached_tokens == 2 * BS and longer.num_uncomputed_tokens == 1
    assert len(longer.block_table) == 3


def test_cache_full_blocks_registers_only_computed_full_blocks_and_is_idempotent() -> None:
    kv = KVCacheManager(8, BS)
    seq = make_seq(0, list(range(10)))
    assert kv.allocate(seq, 6)  # chunk of 6 -> 2 blocks
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 6
    kv.cache_full_blocks(seq)
    kv.cache_full_blocks(seq)
    assert kv.stats.num_cached_blocks == 1
    probe = make_seq(1, list(range(10)))
    assert kv.lookup_prefix(probe) == BS
    assert kv.allocate(seq, 4)
    seq.num_computed_tokens = 10
    kv.cache_full_blocks(seq)
    assert kv.stats.num_cached_blocks == 2
    assert kv.lookup_prefix(probe) == 2 * BS
    # A different first block breaks the chain even when the second block's tokens match.
    assert kv.lookup_prefix(make_seq(2, [9, 9, 9, 9, 4, 5, 6, 7, 8])) == 0


def test_allocate_clamps_to_remaining_tokens() -> None:
    kv = KVCacheManager(8, BS)
    seq = make_seq(0, [1, 2, 3, 4, 5])
    assert kv.blocks_needed(seq, 1000) == 250  # not clamped: used for worst-case reservations
    assert kv.allocate(seq, 1000)
    assert len(seq.block_table) == 2 and kv.num_free_blocks == 6


def test_allocate_is_all_or_nothing() -> None:
    kv = KVCacheManager(4, BS)
    prefix = list(range(2 * BS))
    owner = make_seq(0, [*prefix, 50])
    run_prefill(kv, owner)
    kv.free(owner)  # two hashed blocks evictable, one plain free
    hog = make_seq(1, [7])
    assert kv.allocate(hog, 1)  # takes the plain free block
    big = make_seq(2, [*prefix, *range(60, 60 + 2 * BS)])  # 2 evictable hits + 2 fresh needed; 3 free
    free_before, stats_before = kv.num_free_blocks, kv.stats
    assert not kv.can_allocate(big, big.num_tokens)
    assert not kv.allocate(big, big.num_tokens)
    assert big.block_table == [] and big.num_computed_tokens == 0 and big.num_cached_tokens == 0
    assert kv.num_free_blocks == free_before and kv.stats == stats_before
    kv.check_invariants()
    # The same request fits once the hog leaves, and it still reuses the cached prefix.
    kv.free(hog)
    assert kv.allocate(big, big.num_tokens)
    assert big.num_cached_tokens == 2 * BS and kv.num_free_blocks == 0
    kv.check_invariants()


def test_free_keeps_blocks_cached_and_evictable() -> None:
    kv = KVCacheManager(8, BS)
    seq = make_seq(0, list(range(2 * BS + 1)))
    run_prefill(kv, seq)
    table = list(seq.block_table)
    kv.free(seq)
    assert seq.block_table == []
    assert kv.num_free_blocks == 8 and kv.stats.num_used_blocks == 0
    assert kv.stats.num_cached_blocks == 2
    again = make_seq(1, list(range(2 * BS + 1)))
    assert kv.allocate(again, again.num_tokens)
    assert again.block_table[:2] == table[:2]
    assert all(kv.ref_count(b) == 1 for b in again.block_table)
    kv.check_invariants()


def test_lru_eviction_order_and_hit_refreshes_recency() -> None:
    kv = KVCacheManager(4, 2)
    p1, p2 = make_seq(0, [1, 2, 3]), make_seq(1, [5, 6, 7])
    run_prefill(kv, p1)
    run_prefill(kv, p2)
    kv.free(p1)
    kv.free(p2)  # LRU order of cached blocks: p1's then p2's; partial blocks go to the plain free list

    # A hit on p1's block takes it out of the LRU; freeing it again makes it most recently used.
    reuse = make_seq(2, [1, 2, 9])
    assert kv.allocate(reuse, 3) and reuse.num_cached_tokens == 2
    kv.free(reuse)

    filler = make_seq(3, [20, 21, 22, 23, 24, 25])  # 3 blocks: 2 plain free, then 1 eviction
    assert kv.allocate(filler, 6)
    assert kv.stats.num_evictions == 1
    assert kv.lookup_prefix(make_seq(4, [5, 6, 7])) == 0  # p2's block was least recently freed
    assert kv.lookup_prefix(make_seq(5, [1, 2, 7])) == 2
    kv.check_invariants()


def test_free_releases_tail_blocks_before_head_blocks() -> None:
    kv = KVCacheManager(4, BS)
    tokens = list(range(3 * BS + 1))
    seq = make_seq(0, tokens)
    run_prefill(kv, seq)
    kv.free(seq)  # 3 cached blocks + 1 plain
    assert kv.allocate(make_seq(1, [77, 78]), 2)  # plain block
    assert kv.allocate(make_seq(2, [88, 89]), 2)  # evicts exactly one cached block: the tail
    assert kv.lookup_prefix(make_seq(3, tokens)) == 2 * BS


def test_prefix_caching_disabled() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    tokens = list(range(3 * BS))
    run_prefill(kv, make_seq(0, tokens))
    b = make_seq(1, tokens)
    assert kv.lookup_prefix(b) == 0
    assert kv.allocate(b, b.num_tokens) and b.num_cached_tokens == 0
    kv.free(b)
    assert kv.stats.num_cached_blocks == 0 and kv.stats.num_queried_tokens == 0
    kv.check_invariants()


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(8, BS)
    tokens = list(range(2 * BS + 1))
    live, done = make_seq(0, tokens), make_seq(1, [*range(50, 50 + BS), 1])
    run_prefill(kv, live)
    run_prefill(kv, done)
    kv.free(done)
    kv.reset_prefix_cache()
    assert kv.stats.num_cached_blocks == 0 and kv.num_free_blocks == 8 - 3
    assert kv.lookup_prefix(make_seq(2, tokens)) == 0
    kv.free(live)
    assert kv.num_free_blocks == 8
    kv.check_invariants()


def test_random_alloc_free_cycles_keep_invariants() -> None:
    rng = random.Random(1234)
    kv = KVCacheManager(24, BS)
    live: list[Sequence] = []
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 or not live:
            # Tiny vocabulary and shared stems make prefix hits and block sharing frequent.
            stem = [rng.randrange(2) for _ in range(rng.choice([0, BS, 2 * BS, 3 * BS]))]
            seq = make_seq(next_id, stem + [rng.randrange(3) for _ in range(rng.randint(1, 2 * BS))])
            next_id += 1
            if kv.allocate(seq, rng.randint(1, seq.num_tokens)):
                assert seq.num_cached_tokens == seq.num_computed_tokens < seq.num_tokens
                live.append(seq)
            else:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
        elif op < 0.75:
            seq = rng.choice(live)
            # Engine step: compute what is allocated, maybe append a token, then grow.
            seq.num_computed_tokens = min(
                seq.num_tokens, len(seq.block_table) * BS, seq.num_computed_tokens + 3
            )
            kv.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(3))
            before = list(seq.block_table)
            if not kv.allocate(seq, rng.randint(1, 6)):
                assert seq.block_table == before
        else:
            seq = live.pop(rng.randrange(len(live)))
            kv.free(seq)
            seq.num_computed_tokens = 0
        kv.check_invariants()
        owners: dict[int, list[tuple[Sequence, int]]] = {}
        for s in live:
            assert len(set(s.block_table)) == len(s.block_table)
            for idx, blk in enumerate(s.block_table):
                owners.setdefault(blk, []).append((s, idx))
        for blk in range(kv.num_blocks):
            assert kv.ref_count(blk) == len(owners.get(blk, []))
        assert kv.num_free_blocks + len(owners) == kv.num_blocks
        # A shared block must hold the same token history in every owner (same position, same prefix).
        for shared in owners.values():
            (s0, i0), *rest = shared
            for s, i in rest:
                assert i == i0
                assert s.token_ids[: (i + 1) * BS] == s0.token_ids[: (i0 + 1) * BS]
    assert kv.stats.num_hit_tokens > 0 and kv.stats.num_evictions > 0
