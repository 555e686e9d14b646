"""Per-token cost of stop-string matching for 4 and for 60,000 stop strings (issue 12 item 1, engine side).

Compares, on the same text fed in ~4-character tokens:

- scan: the old way, `str.find` of every stop string in the new tail plus a hold-back loop testing every
  string with `startswith` (what `IncrementalDetokenizer.check_stop` / `_holdback` did before);
- regex: one compiled alternation of the escaped strings, searched over the new tail (matching only: it
  gives the leftmost match, not the first to complete, and no hold-back length, so it does less work);
- automaton: `fxllm.runtime.stop_matcher.StopMatcher` (Aho-Corasick), matching plus hold-back.

    python benchmarks/stop_matching.py
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import re
import string
import time
from collections.abc import Callable

from fxllm.runtime.stop_matcher import StopMatcher

logger = logging.getLogger("stop_matching")
TEXT = "The quick brown fox jumps over the lazy dog; 12 + 30 = 42. " * 40


def random_stops(count: int, seed: int = 0) -> list[str]:
    """`count` distinct strings of 3-10 letters and digits that never occur in TEXT (no early stop)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    stops: set[str] = set()
    while len(stops) < count:
        stop = "".join(rng.choices(alphabet, k=rng.randint(3, 10)))
        if stop not in TEXT:
            stops.add(stop)
    return sorted(stops)


def tokens_of(text: str, size: int = 4) -> list[str]:
    """The text cut into pieces of `size` characters, as a detokenizer would hand them out."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def run_scan(stops: list[str], pieces: list[str]) -> None:
    """The old per-string scan and hold-back."""
    max_len = max(map(len, stops))
    text = ""
    for piece in pieces:
        checked = len(text)
        text += piece
        for stop in stops:
            if text.find(stop, max(checked - len(stop) + 1, 0)) != -1:
                return
        for length in range(min(max_len - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in stops):
                break


def run_regex(pattern: re.Pattern[str], max_len: int, pieces: list[str]) -> None:
    """One compiled alternation searched over each new tail."""
    text = ""
    for piece in pieces:
        checked = len(text)
        text += piece
        if pattern.search(text, max(checked - max_len + 1, 0)):
            return


def run_automaton(matcher: StopMatcher, pieces: list[str]) -> None:
    """The automaton: new characters only, plus the hold-back length."""
    text = ""
    state = 0
    for piece in pieces:
        checked = len(text)
        text += piece
        state, end, _ = matcher.scan(state, text, checked)
        if end >= 0:
            return
        matcher.holdback(state)


def per_token_us(fn: Callable[[], None], tokens: int, repeat: int = 3) -> float:
    """Best of `repeat` runs, in microseconds per token."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / tokens * 1e6


def main() -> None:
    """Build each matcher for 4 and 60,000 strings; print build time and per-token cost."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 60_000])
    parser.add_argument("--scan-tokens", type=int, default=20, help="old-scan tokens above 1,000 strings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pieces = tokens_of(TEXT)
    for count in args.counts:
        stops = random_stops(count)
        start = time.perf_counter()
        pattern = re.compile("|".join(map(re.escape, stops)))
        regex_build = time.perf_counter() - start
        start = time.perf_counter()
        matcher = StopMatcher(stops)
        automaton_build = time.perf_counter() - start
        # The old scan is O(count) per token: fewer tokens keep it to seconds at 60,000 strings.
        scan_pieces = pieces if count <= 1000 else pieces[: args.scan_tokens]
        scan_repeat = 1 if count > 1000 else 3
        scan = per_token_us(functools.partial(run_scan, stops, scan_pieces), len(scan_pieces), scan_repeat)
        regex = per_token_us(functools.partial(run_regex, pattern, matcher.max_len, pieces), len(pieces))
        automaton = per_token_us(functools.partial(run_automaton, matcher, pieces), len(pieces))
        logger.info(
            "%6d strings: per token scan %.1f us, regex %.1f us, automaton %.1f us; "
            "build regex %.1f ms, automaton %.1f ms (%d states)",
            count, scan, regex, automaton, regex_build * 1e3, automaton_build * 1e3, matcher.num_states,
        )  # fmt: skip


if __name__ == "__main__":
    main()
