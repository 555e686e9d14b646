"""Dynamo's pre-tokenized request dict to fxllm's SamplingParams, and fxllm's outputs to Dynamo chunks.

Pure functions over plain dicts: nothing here imports Dynamo, so they are tested without it installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fxllm.runtime.outputs import CompletionOutput, RequestOutput
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams

# Dynamo's `sampling_options` keys that map one to one onto SamplingParams fields.
_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
# fxllm's finish reasons to Dynamo's (the Rust layer maps "cancelled" and the rest to OpenAI's).
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def _stop_token_ids(stop_conditions: Mapping[str, Any]) -> list[int]:
    # The frontend sends the model's EOS ids as `stop_token_ids_hidden` and the client's as
    # `stop_token_ids` (or `stop_token_ids_visible`); all end generation here (the frontend hides the first).
    merged: list[int] = []
    for key in ("stop_token_ids_hidden", "stop_token_ids", "stop_token_ids_visible"):
        for token_id in stop_conditions.get(key) or []:
            if int(token_id) not in merged:
                merged.append(int(token_id))
    return merged


def to_sampling_params(request: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams (DELTA outputs) for one Dynamo request; ValueError naming a bad or unsupported field.

    Stop strings are left to the frontend, which matches them on the detokenized stream and then cancels
    the request (as Dynamo's vLLM backend does); the engine sees token-level stop conditions only.
    """
    sampling = request.get("sampling_options") or {}
    stop = request.get("stop_conditions") or {}
    output = request.get("output_options") or {}
    n = sampling.get("n")
    if n not in (None, 1):
        raise ValueError(f"sampling_options.n={n!r}: this worker returns one choice per request (n=1)")
    fields: dict[str, Any] = {k: sampling[k] for k in _SAMPLING_KEYS if sampling.get(k) is not None}
    if sampling.get("use_beam_search"):
        raise ValueError("sampling_options.use_beam_search: fxllm has no beam search")
    if stop.get("max_tokens") is not None:
        fields["max_tokens"] = int(stop["max_tokens"])
    else:
        fields["max_tokens"] = None  # until the context is full, as the engine resolves it
    if stop.get("min_tokens") is not None:
        fields["min_tokens"] = int(stop["min_tokens"])
    if stop.get("ignore_eos") is not None:
        fields["ignore_eos"] = bool(stop["ignore_eos"])
    fields["stop_token_ids"] = _stop_token_ids(stop)
    if output.get("logprobs") is not None:
        fields["logprobs"] = int(output["logprobs"])
    return SamplingParams(output_kind=RequestOutputKind.DELTA, **fields)


def prompt_token_ids(request: Mapping[str, Any]) -> list[int]:
    """The request's prompt ids as a list (the frontend may send a packed little-endian int32 buffer)."""
    ids = request.get("token_ids")
    if ids is None:
        raise ValueError("the request has no token_ids: this worker takes pre-tokenized requests")
    if isinstance(ids, (bytes, bytearray, memoryview)):
        raw = memoryview(ids).cast("B")
        if raw.nbytes % 4:
            raise ValueError(f"packed token_ids have {raw.nbytes} bytes, not a multiple of 4")
        return [int.from_bytes(raw[i : i + 4], "little", signed=True) for i in range(0, raw.nbytes, 4)]
    return [int(t) for t in ids]


def _logprob_fields(completion: CompletionOutput) -> dict[str, Any]:
    # Dynamo's chunk shape: `log_probs` per token, `top_logprobs` per token as ranked alternatives.
    if completion.logprobs is None:
        return {}
    log_probs: list[float] = []
    top: list[list[dict[str, Any]]] = []
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        chosen = position.get(token_id)
        log_probs.append(chosen.logprob if chosen is not None else float("nan"))
        ranked = sorted(position.values(), key=lambda lp: -lp.logprob)
        top.append([{"rank": r + 1, "token_id": lp.token_id, "token": lp.decoded, "logprob": lp.logprob}
                    for r, lp in enumerate(ranked)])  # fmt: skip
    return {"log_probs": log_probs, "top_logprobs": top}


def to_chunk(output: RequestOutput, num_generated: int) -> dict[str, Any]:
    """The Dynamo chunk for one DELTA output; the last one carries finish_reason and completion_usage.

    `num_generated` counts the request's generated tokens so far, this output's included.
    """
    completion = output.outputs[0] if output.outputs else None
    chunk: dict[str, Any] = {"token_ids": list(completion.token_ids) if completion else [], "index": 0}
    if completion is not None:
        chunk.update(_logprob_fields(completion))
    if output.finished:
        reason = completion.finish_reason if completion is not None else "abort"
        chunk["finish_reason"] = _FINISH_REASONS.get(reason or "abort", "error")
        prompt = len(output.prompt_token_ids)
        chunk["completion_usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": num_generated,
            "total_tokens": prompt + num_generated,
        }
        if output.metrics is not None and output.metrics.num_cached_tokens:
            chunk["completion_usage"]["prompt_tokens_details"] = {
                "cached_tokens": output.metrics.num_cached_tokens
            }
    return chunk
