"""Request validation and construction: prompt, limits against the model and KV pool, one sequence per n."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING

from fxllm.runtime.detokenizer import IncrementalDetokenizer
from fxllm.runtime.request import Request, SequenceState
from fxllm.runtime.sampler import make_generator
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.sequence import Sequence

if TYPE_CHECKING:
    from fxllm.runtime.engine import Engine


def build_request(
    engine: Engine,
    prompt: str | SequenceABC[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
) -> Request:
    """Validate and build a request for `engine` without touching its state (safe from any thread)."""
    params = params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    params = with_extra_eos(params, engine.eos_token_ids)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty; send at least one token")
        text, token_ids = prompt, engine.tokenize(prompt)
    else:
        text, token_ids = None, [int(t) for t in prompt]
    if not token_ids:
        raise ValueError("the prompt is empty; send at least one token")
    bad = [t for t in token_ids if not 0 <= t < engine.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})")
    if len(token_ids) >= engine.max_model_len:
        raise ValueError(
            f"the prompt has {len(token_ids)} tokens but this model's context is {engine.max_model_len} tokens "
            "(prompt plus at least one generated token); shorten the prompt"
        )
    room = engine.max_model_len - len(token_ids)
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens > room:
        raise ValueError(
            f"this model's maximum context length is {engine.max_model_len} tokens; the request asks for "
            f"{len(token_ids) + max_tokens} ({len(token_ids)} in the prompt + {max_tokens} max_tokens); "
            "lower max_tokens or shorten the prompt"
        )
    blocks = -(-(len(token_ids) + max_tokens) // engine.kv_cache.block_size)
    if blocks > engine.kv_cache.num_blocks:
        raise ValueError(
            f"the request may need {blocks} KV blocks but the pool has {engine.kv_cache.num_blocks}; "
            "lower max_tokens or enlarge the KV cache"
        )
    # The engine's own id counters (itertools.count: next() is atomic under the GIL).
    rid = request_id if request_id is not None else f"req-{next(engine._request_ids)}"
    states = []
    now = time.monotonic()
    for i in range(params.n):
        seq = Sequence(next(engine._seq_ids), list(token_ids), len(token_ids), max_tokens, now)
        seed = None if params.seed is None else params.seed + i
        states.append(
            SequenceState(
                seq=seq,
                detokenizer=IncrementalDetokenizer(engine.tokenizer, token_ids, params)
                if engine.tokenizer
                else None,  # type: ignore[arg-type]
                generator=make_generator(seed, engine.runner.device),
                max_tokens=max_tokens,
                logprobs=[] if params.logprobs is not None else None,
            )
        )
    request = Request(rid, text, token_ids, params, states)
    if params.prompt_logprobs is not None:
        # The first sequence computes the whole prompt (no prefix-cache reuse: every position needs
        # its logits); the others of n > 1 may reuse its blocks.
        states[0].seq.reuse_prefix_cache = False
        request.prompt_logprobs = [None] * len(token_ids)
    return request


def with_extra_eos(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> SamplingParams:
    """`params` with the further EOS ids added to stop_token_ids (a copy; none with ignore_eos)."""
    extra = [t for t in eos_token_ids[1:] if t not in params.stop_token_ids]
    if not extra or params.ignore_eos:
        return params
    return dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *extra])
