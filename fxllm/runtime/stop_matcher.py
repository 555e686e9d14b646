"""Stop strings matched by one Aho-Corasick automaton per request: a token's cost does not grow with the list.

Scanning every stop string for every token costs O(number of strings) per token (a 60,000-string list
stalled every other request on the engine thread). The automaton reads each new character once with
amortized O(1) work, whatever the number or length of the strings, and its state also gives the tail a
stream must hold back: the longest suffix of the text that is a proper prefix of some stop string.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence

# Lists up to this many characters in all are cached by content: requests repeating a stop list (a chat
# template's end markers) share one automaton. Larger ones are built per request and not kept, so the
# cache holds at most 64 x 1024 states (a few MB).
CACHE_MAX_CHARS = 1024


class StopMatcher:
    """An immutable automaton over a set of stop strings; each sequence keeps its own state (an int).

    State 0 is the empty string; `scan` moves a state over new text. A state stands for the longest
    suffix of the text read so far that is a prefix of some stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """Build the trie and its failure links: O(total length of the strings), done once per request."""
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop strings must be a non-empty list of non-empty strings")
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        complete = [0]  # length of the stop string that ends exactly at this state, or 0
        for stop in stops:
            state = 0
            for char in stop:
                nxt = goto[state].get(char)
                if nxt is None:
                    nxt = len(goto)
                    goto[state][char] = nxt
                    goto.append({})
                    depth.append(depth[state] + 1)
                    complete.append(0)
                state = nxt
            complete[state] = len(stop)
        fail = [0] * len(goto)
        # match[s]: the longest stop string that is a suffix of s (ties at one end: the longer wins).
        # hold[s]: the longest suffix of s that is a proper prefix of a stop string (it may still grow).
        match = complete[:]
        hold = [0] * len(goto)
        queue = deque(goto[0].values())
        while queue:  # breadth first: a state's failure link is shallower, so it is final already
            state = queue.popleft()
            if not match[state]:
                match[state] = match[fail[state]]
            hold[state] = depth[state] if goto[state] else hold[fail[state]]
            for char, child in goto[state].items():
                if state:
                    link = fail[state]
                    while link and char not in goto[link]:
                        link = fail[link]
                    fail[child] = goto[link].get(char, 0)
                queue.append(child)
        self._goto, self._fail, self._match, self._hold = goto, fail, match, hold
        self.max_len = max(len(s) for s in stops)
        self.num_states = len(goto)

    def scan(self, state: int, text: str, start: int = 0, report: bool = True) -> tuple[int, int, int]:
        """Move `state` over text[start:]; returns (state, end, length) of the first stop string completed.

        The first match to complete wins (at one end position: the longest), as if the text arrived one
        character at a time; then the scan stops there (end is the index after its last character). No
        match gives (state, -1, 0). With report=False it only advances (matches are ignored).
        """
        goto, fail, match = self._goto, self._fail, self._match
        for offset, char in enumerate(text[start:]):
            # Follow failure links until the character extends a prefix; amortized O(1) per character
            # because each link shortens the state and each character lengthens it by at most one.
            while True:
                nxt = goto[state].get(char)
                if nxt is not None:
                    state = nxt
                    break
                if not state:
                    break
                state = fail[state]
            if report and match[state]:
                return state, start + offset + 1, match[state]
        return state, -1, 0

    def holdback(self, state: int) -> int:
        """Characters at the end of the text (read up to `state`) that may still grow into a stop string."""
        return self._hold[state]


@functools.lru_cache(maxsize=64)
def _cached_matcher(stops: tuple[str, ...]) -> StopMatcher:
    return StopMatcher(stops)


def stop_matcher_for(stops: tuple[str, ...]) -> StopMatcher:
    """A matcher for `stops`, shared with earlier requests that had the same small list."""
    if sum(len(s) for s in stops) <= CACHE_MAX_CHARS:
        return _cached_matcher(stops)
    return StopMatcher(stops)
