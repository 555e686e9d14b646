"""N-gram prompt lookup: draft the tokens that followed the latest earlier occurrence of the context's tail.

Input-grounded generation (rewrite, extract, edit a given text or code) copies long spans of its input;
when the last n tokens appeared before, the tokens that came after them are a cheap, often right guess.
As vLLM's and TensorRT-LLM's n-gram proposers: the longest n in [min, max] with a match wins; unlike
vLLM (first match) the latest earlier occurrence is used, which follows the span being copied now.
"""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` drafted ids continuing `token_ids`, or [] when no suffix n-gram occurred earlier."""
    total = len(token_ids)
    if k <= 0:
        return []
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        pattern = list(token_ids[total - n :])
        first = pattern[0]
        # Scan earlier start positions from the latest; the match must end before the suffix itself.
        for start in range(total - n - 1, -1, -1):
            if token_ids[start] == first and list(token_ids[start : start + n]) == pattern:
                follow = list(token_ids[start + n : start + n + k])
                if follow:
                    return follow
    return []
