"""Incremental detokenization, stop strings and stop tokens for one output sequence.

How the engine uses it, per output sequence and per sampled token:

1. ``finish_reason_for_token(...)`` decides whether the token ends the sequence by EOS, a stop token
   id or max_tokens. A stop token (or EOS) that ends the sequence is appended to the detokenizer only
   if ``include_stop_str_in_output`` (vLLM does the same; with skip_special_tokens EOS decodes to "").
2. ``det.append(token_id)`` decodes the token; ``det.check_stop()`` then says whether a stop string
   completed (``finish_reason="stop"``, ``stop_reason=<the string>``), having already truncated
   ``det.text``.
3. A streaming client is sent only ``det.safe_delta(final=finished)``: it holds back a tail that could
   still grow into a stop string, so truncated text is never streamed. With ``final=True`` it flushes
   everything left. Concatenating every safe_delta gives exactly the final ``det.text``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Tokens of context decoded before the new ones: enough for decoders that strip or merge across token
# boundaries (SentencePiece's leading space, byte-level BPE's split UTF-8) to render them correctly.
INITIAL_PREFIX_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer needs."""

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        """Turn token ids into text."""
        ...


def finish_reason_for_token(
    token_id: int,
    num_output_tokens: int,
    params: SamplingParams,
    eos_token_id: int | None,
    max_tokens: int | None = None,
) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) if the just-sampled token ends the sequence, else None.

    `num_output_tokens` counts `token_id`; `max_tokens` is the engine-resolved limit (params.max_tokens,
    or what the context length leaves when that is None). EOS gives ("stop", None), a stop token id
    gives ("stop", token_id), the limit gives ("length", None). Stop conditions wait for min_tokens.
    """
    limit = params.max_tokens if max_tokens is None else max_tokens
    if num_output_tokens >= params.min_tokens:
        if token_id == eos_token_id and not params.ignore_eos:
            return "stop", None
        if token_id in params.stop_token_ids:
            return "stop", token_id
    if limit is not None and num_output_tokens >= limit:
        return "length", None
    return None


class IncrementalDetokenizer:
    """Decodes one output sequence token by token in O(1) per token and finds stop strings.

    Uses the prefix/read offset technique of vLLM and TGI: decode a short window of already-read
    tokens with and without the new ones, and emit the difference once it no longer ends in an
    incomplete character.
    """

    def __init__(
        self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Start after `prompt_token_ids`, whose tail gives the first output token its context."""
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - INITIAL_PREFIX_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.num_output_tokens = 0
        self.text = ""
        self.stop_reason: str | None = None
        self._max_stop_len = params.max_stop_len
        self._checked = 0  # chars of text already searched for stop strings
        self._emitted = 0  # chars of text already handed out by safe_delta

    def _decode(self, token_ids: list[int]) -> str:
        # Cleanup is off: it rewrites spaces around punctuation, which would differ between windows.
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def append(self, token_id: int) -> str:
        """Add one generated token; return the new text (may be "" while a character is incomplete)."""
        if self.stop_reason is not None:
            raise RuntimeError(f"append() after stop string {self.stop_reason!r} ended the sequence")
        self.token_ids.append(token_id)
        self.num_output_tokens += 1
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        # A trailing U+FFFD means the last token ended mid-character: wait for the rest of its bytes,
        # keeping the offsets so the next decode sees them all.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def check_stop(self) -> str | None:
        """Return the stop string that completed (truncating `text` at it), else None.

        `text` is cut before the match, or after it with include_stop_str_in_output. Idempotent; stop
        strings are ignored until min_tokens tokens are out.
        """
        if self.stop_reason is not None:
            return self.stop_reason
        if not self.params.stop or len(self.text) == self._checked:
            return None
        checked = self._checked
        self._checked = len(self.text)
        if self.num_output_tokens < self.params.min_tokens:
            return None
        # The match that completes first wins (ties: the longer one), as if text arrived char by char,
        # so the result does not depend on how many characters a token carried.
        best: tuple[int, int, str] | None = None
        for stop in self.params.stop:
            # Only matches ending in the unchecked tail are new (older ones fell under min_tokens).
            pos = self.text.find(stop, max(checked - len(stop) + 1, 0))
            if pos != -1:
                key = (pos + len(stop), pos, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is None:
            return None
        end, pos, stop = best
        self.text = self.text[: end if self.params.include_stop_str_in_output else pos]
        self._checked = len(self.text)
        self.stop_reason = stop
        logger.debug("stop string %r matched at char %d", stop, pos)
        return stop

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for length in range(min(self._max_stop_len - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return length
        return 0

    def safe_delta(self, final: bool = False) -> str:
        """Text not yet handed out that can no longer be cut by a stop string (all of it if final).

        The engine streams only these deltas; their concatenation equals the final `text`.
        """
        self.check_stop()
        end = len(self.text)
        if not final and self.stop_reason is None:
            end -= self._holdback()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
