"""Prompt logprobs (`SamplingParams.prompt_logprobs`): per prompt token, its logprob given the tokens before it.

The step's inputs ask the graph for logits at every prompt position of the chunk whose next token is a
prompt token (`StepInputs.prompt_rows`, after the sampled rows); here they become, per position p + 1,
{token: Logprob} with the prompt's own token and the top-k, from a float32 log-softmax of the raw logits
(no temperature or penalties, as vLLM). Position 0 has no context and stays None. A chunked prefill fills
its slice each step; a preempted sequence recomputes and overwrites the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fxllm.runtime.outputs import Logprob
from fxllm.runtime.request import Request

PromptLogprobs = list[dict[int, Logprob] | None]


def prompt_logprob_entries(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[dict[int, Logprob]]:
    """Rows of logits [M, V] and the token each row predicts -> per row {target: Logprob, then the top-k}."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, index[:, None]).squeeze(1).tolist()
    top_ids: list[list[int]] = [[] for _ in targets]
    top_lps: list[list[float]] = [[] for _ in targets]
    if k > 0:
        values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
        top_ids, top_lps = ids.tolist(), values.tolist()
    entries = []
    for target, lp, ids_row, lps_row in zip(targets, chosen, top_ids, top_lps):
        entry = {target: Logprob(token_id=target, logprob=lp)}
        for token, value in zip(ids_row, lps_row):
            entry.setdefault(token, Logprob(token_id=token, logprob=value))
        entries.append(entry)
    return entries


def record_prompt_logprobs(
    request: Request, token_ids: Sequence[int], first: int, logits: torch.Tensor, tokenizer: Any
) -> None:
    """Fill the request's prompt logprobs of positions first + 1, ... from the logits of positions first, ..."""
    into, k = request.prompt_logprobs, request.params.prompt_logprobs
    if into is None or k is None:
        raise RuntimeError(f"request {request.request_id} got prompt logits but asked no prompt logprobs")
    count = logits.shape[0]
    if first + count >= len(into):
        raise RuntimeError(
            f"prompt logits for positions {first}..{first + count - 1} of a {len(into)}-token prompt"
        )
    targets = token_ids[first + 1 : first + 1 + count]
    entries = prompt_logprob_entries(logits, targets, k)
    if tokenizer is not None:
        for entry in entries:
            for lp in entry.values():
                lp.decoded = tokenizer.decode([lp.token_id])
    into[first + 1 : first + 1 + count] = entries
