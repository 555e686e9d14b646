"""`/v1/completions` with `echo: true`: the prompt comes back in front of the completion, with its logprobs.

This is how lm-evaluation-harness's `local-completions` model scores text through a server: it sends
`echo: true, logprobs: k` and `max_tokens: 0` (or 1, dropping the last token) and reads, in the legacy
OpenAI format, `tokens`, `token_logprobs` (the first prompt token's is null: nothing precedes it),
`top_logprobs` and `text_offset` over prompt plus completion. As vLLM does, `max_tokens: 0` runs one
token and returns none of it (no generated text, tokens or usage); the prompt logprobs come from
`SamplingParams.prompt_logprobs` (the prompt is then computed in full, never read from the prefix cache).
Streaming with echo is not supported (400).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fxllm.runtime.outputs import CompletionOutput, RequestOutput
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.serve import protocol as P
from fxllm.serve.errors import bad_request


@dataclass(frozen=True)
class EchoPlan:
    """What an echo request changes: the max_tokens the engine runs, and whether the completion is dropped."""

    enabled: bool
    max_tokens: int | None  # what the engine runs (0 -> 1)
    prompt_only: bool  # max_tokens 0: the generated token is dropped from the response

    @classmethod
    def of(cls, req: P.CompletionRequest) -> EchoPlan:
        """The plan for a completions request; a 400 for max_tokens 0 without echo, or echo with stream."""
        if not req.echo:
            if req.max_tokens == 0:
                raise bad_request(
                    "max_tokens must be >= 1 (0 is allowed only with echo: true)", param="max_tokens"
                )
            return cls(False, req.max_tokens, False)
        if req.stream:
            raise bad_request("echo is not supported with stream: true", param="echo")
        prompt_only = req.max_tokens == 0
        return cls(True, 1 if prompt_only else req.max_tokens, prompt_only)

    def params(self, params: SamplingParams, logprobs: int | None) -> SamplingParams:
        """`params` asking for prompt logprobs where the response will echo logprobs."""
        if not self.enabled or logprobs is None:
            return params
        return dataclasses.replace(params, prompt_logprobs=logprobs)

    def choice(
        self, index: int, out: RequestOutput, c: CompletionOutput, num_top: int, tokenizer: Any, prompt: Any
    ) -> P.CompletionChoice:
        """A choice whose text (and logprobs) are the prompt's followed by the completion's (none for max_tokens 0);
        `prompt` is the request's prompt: its text is echoed as sent, token ids are decoded."""
        prompt_ids = out.prompt_token_ids
        prompt_text = prompt if isinstance(prompt, str) else _decode(tokenizer, prompt_ids)
        text = prompt_text if self.prompt_only else prompt_text + c.text
        logprobs = None
        if c.logprobs is not None or out.prompt_logprobs is not None:
            logprobs = self._logprobs(out, c, num_top, tokenizer, len(prompt_text))
        finish = "length" if self.prompt_only else c.finish_reason
        stop = None if self.prompt_only else c.stop_reason
        return P.CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop
        )

    def _logprobs(
        self, out: RequestOutput, c: CompletionOutput, num_top: int, tokenizer: Any, prompt_chars: int
    ) -> P.CompletionLogprobs:
        prompt_ids, entries = out.prompt_token_ids, out.prompt_logprobs
        if entries is None:
            raise RuntimeError(
                f"request {out.request_id} echoes logprobs but its output has no prompt logprobs"
            )
        first = _decode(tokenizer, prompt_ids[:1])
        result = P.CompletionLogprobs(
            text_offset=[0], token_logprobs=[None], tokens=[first], top_logprobs=[None]
        )
        rest = P.completion_logprobs(list(prompt_ids[1:]), entries[1:], num_top, len(first))  # type: ignore[arg-type]
        parts = [rest]
        if not self.prompt_only and c.logprobs is not None:
            parts.append(P.completion_logprobs(c.token_ids, c.logprobs, num_top, prompt_chars))
        for part in parts:
            result.text_offset += part.text_offset
            result.token_logprobs += part.token_logprobs
            result.tokens += part.tokens
            result.top_logprobs += part.top_logprobs
        return result

    def usage(self, finals: list[RequestOutput]) -> P.UsageInfo:
        """Token counts; a prompt-only echo generated nothing the client sees."""
        usage = P.usage_of(finals)
        if self.prompt_only:
            usage.completion_tokens, usage.total_tokens = 0, usage.prompt_tokens
        return usage


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        raise bad_request("echo needs the model's tokenizer to return the prompt's text; this model has none")
    return str(tokenizer.decode(ids))
