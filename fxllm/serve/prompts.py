"""Prompts off the event loop: refuse over-long text by its bytes, then tokenize or render chat templates
on worker threads, so a megabyte prompt never stalls /health or other clients' streams."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from fxllm.runtime.sampling_params import SamplingParams
from fxllm.serve.errors import bad_request, from_value_error

if TYPE_CHECKING:
    from fxllm.llm import LLM

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Tokenizer threads: HF fast tokenizers release the GIL, so a few run in parallel with the loop; more
# would only let hostile prompts take more cores from the engine.
TOKENIZE_THREADS = 4
# ...and they run at a lower CPU priority (Linux nice, per thread), so that on a busy machine the event
# loop and the engine thread win the cores over a megabyte prompt being tokenized.
TOKENIZE_NICENESS = 10


def _decodes_like_its_backend(tokenizer: Any) -> bool:
    """Whether `tokenizer.batch_decode` is its Rust backend's decode of each sequence, nothing added: a
    transformers fast tokenizer that overrides no decode step and cleans up no spaces."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and cls._decode is TokenizersBackend._decode
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls.batch_decode is PreTrainedTokenizerBase.batch_decode
        and not tokenizer.clean_up_tokenization_spaces
    )


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes one token of `tokenizer` stands for (+1: SentencePiece drops a token's leading
    space when it is decoded alone)."""
    ids = [[i] for i in range(len(tokenizer))]
    if _decodes_like_its_backend(tokenizer):
        # The same texts in one Rust call: SmolLM2's 49k tokens in 0.06 s instead of 0.43 s, on every
        # `fxllm serve` start (issue 13).
        texts = tokenizer.backend_tokenizer.decode_batch(ids, skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
    return max(len(text.encode()) for text in texts) + 1


def prompt_byte_limit(llm: LLM, configured: int | None) -> int | None:
    """server.max_prompt_bytes, or max_model_len x longest_token_bytes: a text longer than that cannot fit
    the context with a lossless tokenizer (byte-level BPE, SentencePiece), where a token covers at most
    the bytes it decodes to. None without a tokenizer (only token ids can be sent then)."""
    if configured is not None:
        return configured
    tokenizer = llm.engine.tokenizer
    if tokenizer is None:
        return None
    return llm.engine.max_model_len * longest_token_bytes(tokenizer)


def _lower_priority() -> None:
    with suppress(OSError, AttributeError):  # per-thread niceness is Linux's; elsewhere threads keep theirs
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZE_NICENESS)


class PromptPreparer:
    """Turns completion prompts and chat conversations into token ids on a small thread pool."""

    def __init__(self, llm: LLM, max_prompt_bytes: int | None) -> None:
        self.llm = llm
        self.max_bytes = prompt_byte_limit(llm, max_prompt_bytes)
        self._pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="fxllm-tokenize",
                                        initializer=_lower_priority)  # fmt: skip

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_bytes(self, size: int, param: str) -> None:
        """400 for text that cannot fit the context whatever it tokenizes to."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise bad_request(f"the {param} is {size} bytes; at most {self.max_bytes} bytes can fit this model's "
                              f"{self.llm.engine.max_model_len}-token context (server.max_prompt_bytes); "
                              f"shorten the {param}", param=param)  # fmt: skip

    async def completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]], params: SamplingParams
    ) -> list[list[int]]:
        """Token ids of each prompt of /v1/completions (a string, strings, token ids or lists of them),
        each validated against the context with `params`."""
        single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
        items: list[Any] = [prompt] if single else list(prompt)
        if not items:
            raise bad_request("prompt must not be empty", param="prompt")
        for item in items:
            if isinstance(item, str):
                self.check_bytes(len(item.encode()), "prompt")
        engine = self.llm.engine

        def tokenize() -> list[list[int]]:
            prompts = [engine.tokenize(p) if isinstance(p, str) else list(p) for p in items]
            for ids in prompts:  # here, not on the loop: a refused prompt may be 200k tokens long
                engine.build_request(ids, params)
            return prompts

        try:
            return await self.run(tokenize)
        except ValueError as exc:
            raise from_value_error(exc) from None

    async def chat_prompt(self, conversation: list[dict[str, str]], params: SamplingParams) -> list[int]:
        """Token ids of a conversation rendered with the chat template, validated with `params`."""
        self.check_bytes(sum(len(m["content"].encode()) for m in conversation), "messages")
        try:
            prompt = await self.run(self.llm.apply_chat_template, conversation)
        except Exception as exc:  # bad roles, or the template's own raise_exception (jinja2 errors)
            raise bad_request(str(exc), param="messages") from None
        try:
            await self.run(self.llm.engine.build_request, prompt, params)
        except ValueError as exc:
            raise from_value_error(exc) from None
        return prompt

    def close(self) -> None:
        """Stop the threads (queued work is dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
