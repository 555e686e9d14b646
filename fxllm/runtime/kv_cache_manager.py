"""Paged KV-cache block manager with reference counting and hash-based prefix caching."""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Protocol

from fxllm.runtime.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class KVCacheManagerStats:
    """Snapshot of cache occupancy and prefix-cache effectiveness."""

    num_hit_tokens: int
    num_queried_tokens: int
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the prefix cache."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (0..1)."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass
class _AllocationPlan:
    """What allocate() would do, computed without side effects so that it can be all-or-nothing."""

    hit_blocks: list[int]
    hit_hashes: list[bytes]
    num_fresh_blocks: int
    feasible: bool


class KVCacheObserver(Protocol):
    """Told of every prefix-cache index change (e.g. to publish KV events to a router); called on the
    engine thread, so it must only queue the news."""

    def blocks_stored(self, parent_hash: bytes | None, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        """Consecutive full blocks (digest, token ids) entered the index; `parent_hash` precedes the first."""

    def blocks_removed(self, block_hashes: list[bytes]) -> None:
        """These digests left the index (their blocks were evicted for reuse)."""

    def cache_cleared(self) -> None:
        """Every digest left the index (reset_prefix_cache)."""


# The chain's root digest. Collision resistance comes from sha256, not from a secret root, so it is fixed.
_ROOT_DIGEST = bytes(hashlib.sha256().digest_size)


@functools.lru_cache(maxsize=8)
def _token_packer(num_tokens: int) -> struct.Struct:
    # Fixed-width little-endian int64s: the encoding is unambiguous, so different token lists never
    # serialize to the same bytes (the parent digest in front is fixed-width too).
    return struct.Struct(f"<{num_tokens}q")


def _hash_block(parent_hash: bytes | None, tokens: SequenceABC[int]) -> bytes:
    """Chained block digest: sha256 of the parent's digest and the block's token ids.

    Python's `hash` of a tuple is not collision resistant: a crafted prompt could land on another
    user's block and read its KV (vLLM GHSA-rm76-4mrf-v9r8). A hit is also checked against the
    block's stored tokens, so even a digest collision cannot hand out a block with other contents.
    """
    digest = hashlib.sha256(_ROOT_DIGEST if parent_hash is None else parent_hash)
    digest.update(_token_packer(len(tokens)).pack(*tokens))
    return digest.digest()


class KVCacheManager:
    """Hands out fixed-size KV blocks (ids 0..num_blocks-1) to sequences and reuses cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1; give the KV cache more memory.")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        # The token ids each hashed block holds: a hit must match them too (defence against collisions).
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        # Cached blocks nobody references; insertion order = free order, so popitem(last=False) is LRU.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Chain hashes of each sequence's leading full blocks, so cache_full_blocks never rehashes.
        self._seq_hashes: dict[int, list[bytes]] = {}
        self._num_hit_tokens = 0
        self._num_queried_tokens = 0
        self._num_evictions = 0
        self.observers: list[KVCacheObserver] = []

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def stats(self) -> KVCacheManagerStats:
        """Current counters."""
        return KVCacheManagerStats(
            num_hit_tokens=self._num_hit_tokens,
            num_queried_tokens=self._num_queried_tokens,
            num_blocks=self.num_blocks,
            num_used_blocks=self.num_used_blocks,
            num_cached_blocks=len(self._hash_to_block),
            num_evictions=self._num_evictions,
        )

    def ref_count(self, block_id: int) -> int:
        """Number of sequences referencing block_id."""
        return self._ref_counts[block_id]

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks seq needs to hold num_computed_tokens + num_new_tokens (not clamped, no prefix reuse)."""
        total = seq.num_computed_tokens + max(num_new_tokens, 0)
        return max(0, self._cdiv(total) - len(seq.block_table))

    def lookup_prefix(self, seq: Sequence) -> int:
        """Tokens that allocate() would reuse from the prefix cache for seq right now (no side effects)."""
        return len(self._find_prefix(seq)[0]) * self.block_size

    def prefix_hit_blocks(self, seq: Sequence) -> list[int]:
        """Block ids that allocate() would reuse from the prefix cache for seq right now (no side effects)."""
        return self._find_prefix(seq)[0]

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether allocate(seq, num_new_tokens) would succeed."""
        return self._plan(seq, num_new_tokens).feasible

    # ------------------------------------------------------------------ mutation

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Reuse cached prefix blocks (first call only) and grow seq.block_table; all-or-nothing."""
        held = len(seq.block_table) * self.block_size
        if num_new_tokens >= 0 and seq.num_computed_tokens + num_new_tokens <= held and seq.block_table:
            return True  # a running sequence whose blocks already cover this step (most decode steps)
        plan = self._plan(seq, num_new_tokens)
        if not plan.feasible:
            return False
        is_first = not seq.block_table and seq.num_computed_tokens == 0
        for block_id in plan.hit_blocks:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        if is_first and self.enable_prefix_caching:
            num_hit = len(plan.hit_blocks) * self.block_size
            seq.num_computed_tokens = num_hit
            seq.num_cached_tokens = num_hit
            self._seq_hashes[seq.seq_id] = plan.hit_hashes
            self._num_hit_tokens += num_hit
            self._num_queried_tokens += seq.num_tokens
        for _ in range(plan.num_fresh_blocks):
            seq.block_table.append(self._take_fresh_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; hashed blocks stay cached (evictable), the rest return to the free list."""
        # Reverse order: tail blocks become least-recently-freed, so they are evicted before the
        # shared-prefix head blocks that other requests are more likely to hit.
        for block_id in reversed(seq.block_table):
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"Block {block_id} of sequence {seq.seq_id} freed twice (refcount <= 0).")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._block_hashes[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table.clear()
        self._seq_hashes.pop(seq.seq_id, None)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register hashes of seq's blocks that are now full of computed tokens; idempotent."""
        if not self.enable_prefix_caching or not seq.block_table:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = self._seq_hashes.get(seq.seq_id)
        if hashes is None:
            hashes = self._seq_hashes[seq.seq_id] = []
        elif len(hashes) >= num_full:  # nothing newly full: most calls, one per decoded token
            return
        stored: list[tuple[bytes, tuple[int, ...]]] = []  # this call's newly indexed run, for the observers
        run_parent: bytes | None = None  # the digest before the run's first block
        for i in range(len(hashes), num_full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            block_hash = _hash_block(hashes[-1] if hashes else None, tokens)
            hashes.append(block_hash)
            block_id = seq.block_table[i]
            # Another sequence may have computed the same content concurrently; keep the first copy
            # in the index and let this duplicate go back to the plain free list when released.
            if self._block_hashes[block_id] is None and block_hash not in self._hash_to_block:
                self._block_hashes[block_id] = block_hash
                self._block_tokens[block_id] = tuple(tokens)
                self._hash_to_block[block_hash] = block_id
                if self.observers:
                    if not stored:
                        run_parent = hashes[-2] if len(hashes) > 1 else None
                    stored.append((block_hash, tuple(tokens)))
            elif stored:  # a duplicate breaks the run: the next indexed block starts another
                self._notify_stored(run_parent, stored)
                stored = []
        if stored:
            self._notify_stored(run_parent, stored)

    def _notify_stored(self, parent_hash: bytes | None, blocks: list[tuple[bytes, tuple[int, ...]]]) -> None:
        for observer in self.observers:
            observer.blocks_stored(parent_hash, blocks)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; blocks in use keep their data but can no longer be shared."""
        for block_id in self._evictable:
            self._free.append(block_id)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_hashes = [None] * self.num_blocks
        self._block_tokens = [None] * self.num_blocks
        for observer in self.observers:
            observer.cache_cleared()
        logger.info("Prefix cache reset; %d blocks free.", len(self._free))

    def check_invariants(self) -> None:
        """Raise RuntimeError if the block bookkeeping is inconsistent (for tests and debugging)."""
        free = list(self._free)
        if len(set(free)) != len(free):
            raise RuntimeError("Free list contains duplicates.")
        for block_id in free:
            if self._ref_counts[block_id] != 0 or self._block_hashes[block_id] is not None:
                raise RuntimeError(f"Free block {block_id} is referenced or hashed.")
            if block_id in self._evictable:
                raise RuntimeError(f"Block {block_id} is both free and evictable.")
        for block_id in self._evictable:
            if self._ref_counts[block_id] != 0 or self._block_hashes[block_id] is None:
                raise RuntimeError(f"Evictable block {block_id} is referenced or unhashed.")
        num_referenced = sum(1 for rc in self._ref_counts if rc > 0)
        if any(rc < 0 for rc in self._ref_counts):
            raise RuntimeError("Negative refcount.")
        if len(free) + len(self._evictable) + num_referenced != self.num_blocks:
            raise RuntimeError(
                f"free({len(free)}) + evictable({len(self._evictable)}) + referenced({num_referenced}) "
                f"!= num_blocks({self.num_blocks})"
            )
        for block_hash, block_id in self._hash_to_block.items():
            if self._block_hashes[block_id] != block_hash:
                raise RuntimeError(f"Hash index points at block {block_id} with a different hash.")
        if sum(h is not None for h in self._block_hashes) != len(self._hash_to_block):
            raise RuntimeError("Hashed blocks and hash index disagree.")
        for block_id, block_hash in enumerate(self._block_hashes):
            if (block_hash is None) != (self._block_tokens[block_id] is None):
                raise RuntimeError(
                    f"Block {block_id} has a hash without its tokens or tokens without a hash."
                )

    # ------------------------------------------------------------------ internals

    def _cdiv(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _find_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Longest cached run of full leading blocks, never covering the last token."""
        reuse = self.enable_prefix_caching and seq.reuse_prefix_cache
        if not reuse or seq.block_table or seq.num_computed_tokens:
            return [], []
        bs = self.block_size
        # At least the last token must be computed so the step produces logits for it.
        max_blocks = (seq.num_tokens - 1) // bs
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent: bytes | None = None
        for i in range(max_blocks):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            parent = _hash_block(parent, tokens)
            block_id = self._hash_to_block.get(parent)
            # Comparing the tokens is cheap next to the hash and makes a digest collision a miss,
            # never a read of someone else's KV.
            if block_id is None or self._block_tokens[block_id] != tuple(tokens):
                if block_id is not None:
                    logger.warning("prefix-cache digest collision at block %d of sequence %d; not reused",
                                   i, seq.seq_id)  # fmt: skip
                break
            blocks.append(block_id)
            hashes.append(parent)
        return blocks, hashes

    def _plan(self, seq: Sequence, num_new_tokens: int) -> _AllocationPlan:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens={num_new_tokens} must be >= 0.")
        if seq.num_computed_tokens > len(seq.block_table) * self.block_size:
            raise ValueError(
                f"Sequence {seq.seq_id} claims {seq.num_computed_tokens} computed tokens but holds only "
                f"{len(seq.block_table)} blocks; reset num_computed_tokens to 0 after free()."
            )
        hit_blocks, hit_hashes = self._find_prefix(seq)
        num_computed = seq.num_computed_tokens + len(hit_blocks) * self.block_size
        # Drafted tokens (speculative decoding) are verified in the sequence's own slots: they need room too.
        num_new = min(num_new_tokens, seq.num_tokens + len(seq.draft_token_ids) - num_computed)
        num_fresh = max(0, self._cdiv(num_computed + num_new) - len(seq.block_table) - len(hit_blocks))
        # Evictable hits leave the evictable pool when referenced, so they cannot also serve as fresh blocks.
        num_evictable_hits = sum(1 for b in hit_blocks if self._ref_counts[b] == 0)
        feasible = num_fresh <= self.num_free_blocks - num_evictable_hits
        return _AllocationPlan(hit_blocks, hit_hashes, num_fresh, feasible)

    def _take_fresh_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block_hash = self._block_hashes[block_id]
            if block_hash is not None and self._hash_to_block.get(block_hash) == block_id:
                del self._hash_to_block[block_hash]
                for observer in self.observers:
                    observer.blocks_removed([block_hash])
            self._block_hashes[block_id] = None
            self._block_tokens[block_id] = None
            self._num_evictions += 1
        self._ref_counts[block_id] = 1
        return block_id
