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

Decoding uses the tokenizers library's ``DecodeStream`` (Rust) when the tokenizer is a fast one whose
decode is the library's; other tokenizers go through the windowed ``decode`` below, which gives the same
text. Stop strings are matched by one automaton per request (``stop_matcher.py``): a token costs the
same with 4 stop strings as with 60,000.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.stop_matcher import StopMatcher

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
        if token_id in params.stop_token_set:
            return "stop", token_id
    if limit is not None and num_output_tokens >= limit:
        return "length", None
    return None


def fast_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer whose decode is exactly the backend's.

    None for slow tokenizers and for subclasses that override decode (Whisper, CodeGen, ...): their
    text would differ from what `DecodeStream` produces.
    """
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if not isinstance(backend, Tokenizer) or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not PreTrainedTokenizerFast._decode:
        return None
    return backend


class IncrementalDetokenizer:
    """Decodes one output sequence token by token in O(1) per token and finds stop strings.

    The prefix/read offset technique of vLLM and TGI: decode a short window of already-read tokens with
    and without the new ones, and emit the difference once it no longer ends in an incomplete character.
    For fast tokenizers `tokenizers.decoders.DecodeStream` runs the same algorithm in Rust; it takes over
    from the first emitted text (its context is then whole, which it needs), so both give the same text.
    """

    def __init__(
        self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Start after `prompt_token_ids`, whose tail gives the first output token its context."""
        self.tokenizer = tokenizer
        self.params = params
        # The decode window: the prompt's tail at first, never the whole prompt or output (no O(length) copy).
        self.token_ids: list[int] = list(prompt_token_ids[-INITIAL_PREFIX_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.num_output_tokens = 0
        self.text = ""
        self.stop_reason: str | None = None
        self._matcher: StopMatcher | None = params.stop_matcher
        self._state = 0  # the matcher's state after the first `_checked` chars of text
        self._checked = 0  # chars of text already fed to the matcher
        self._emitted = 0  # chars of text already handed out by safe_delta
        self._backend = fast_backend(tokenizer)
        self._stream: Any = None  # a DecodeStream once the window decoder has emitted text

    @property
    def uses_decode_stream(self) -> bool:
        """Whether tokens now go through the tokenizers library's DecodeStream (else the windowed decode)."""
        return self._stream is not None

    @property
    def num_emitted(self) -> int:
        """Characters of `text` handed out by safe_delta so far (they are final)."""
        return self._emitted

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
        if self._stream is not None:
            delta = self._step_stream(token_id)
        else:
            delta = self._step_window()
            if delta and self._backend is not None:
                # DecodeStream starts from ids whose decode does not end mid-character (else it would
                # emit them): the window's context now. From here it steps exactly like the window.
                from tokenizers.decoders import DecodeStream

                context = self.token_ids[self.prefix_offset :]
                self._stream = DecodeStream(context, skip_special_tokens=self.params.skip_special_tokens)
        self.text += delta
        return delta

    def _step_stream(self, token_id: int) -> str:
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception as exc:  # e.g. tokenizers' "Invalid prefix" (vllm#17448): finish with the window
            logger.warning("DecodeStream failed (%s); decoding the rest of this sequence by windows", exc)
            self._stream = self._backend = None
            return self._step_window()
        if not piece:
            return ""
        self._advance()  # the window's offsets in step, so the window decoder can take over after a failure
        return piece

    def _step_window(self) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        # A trailing U+FFFD means the last token ended mid-character: wait for the rest of its bytes,
        # keeping the offsets so the next decode sees them all.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        # Text up to the last token is out: the tokens just read become the next decode's context and
        # older ones are dropped, so `token_ids` stays a few tokens long.
        del self.token_ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.token_ids)

    def check_stop(self) -> str | None:
        """Return the stop string that completed (truncating `text` at it), else None.

        `text` is cut before the match, or after it with include_stop_str_in_output. Idempotent; stop
        strings are ignored until min_tokens tokens are out. Only the new characters are read.
        """
        if self.stop_reason is not None:
            return self.stop_reason
        if self._matcher is None or len(self.text) == self._checked:
            return None
        # Matches completing while fewer than min_tokens tokens are out are skipped for good.
        report = self.num_output_tokens >= self.params.min_tokens
        self._state, end, length = self._matcher.scan(self._state, self.text, self._checked, report)
        if end < 0:
            self._checked = len(self.text)
            return None
        pos = end - length
        stop = self.text[pos:end]
        self.text = self.text[: end if self.params.include_stop_str_in_output else pos]
        self._checked = len(self.text)
        self.stop_reason = stop
        logger.debug("stop string %r matched at char %d", stop, pos)
        return stop

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        return 0 if self._matcher is None else self._matcher.holdback(self._state)

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
