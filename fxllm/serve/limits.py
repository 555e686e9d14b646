"""Per-request limits and OpenAI's field rules, checked before anything is tokenized or queued."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fxllm.config import ServerConfig
from fxllm.serve import protocol as P
from fxllm.serve.errors import OpenAIError, bad_request

# OpenAI's documented range; SamplingParams itself takes any temperature >= 0 (offline users may want more).
MAX_TEMPERATURE = 2.0
# vLLM's range for `seed`: a signed 64-bit integer (torch.Generator takes it, plus n - 1 for the choices).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Roles whose message must carry content (an assistant turn may be empty).
_CONTENT_REQUIRED = ("system", "developer", "user", "tool")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; each limit answers 400 beyond it and names its config key."""

    max_n: int
    max_seqs_per_request: int
    max_stop_strings: int
    max_stop_chars: int
    max_stop_token_ids: int

    @classmethod
    def from_config(cls, server: ServerConfig) -> RequestLimits:
        """The limits of the `server:` config section."""
        return cls(server.max_n, server.max_seqs_per_request, server.max_stop_strings, server.max_stop_chars,
                   server.max_stop_token_ids)  # fmt: skip

    def check_sampling(self, req: P.SamplingFields) -> None:
        """The fields both endpoints share: n, stop lists, temperature, seed, stream_options."""
        n = req.n or 1
        if n > self.max_n:
            raise bad_request(f"n must be <= {self.max_n} (server.max_n), got {n}", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.max_stop_strings:
            raise bad_request(f"stop may hold at most {self.max_stop_strings} strings (server.max_stop_strings), "
                              f"got {len(stops)}", param="stop")  # fmt: skip
        chars = sum(len(s) for s in stops)
        if chars > self.max_stop_chars:
            raise bad_request(f"the stop strings may total at most {self.max_stop_chars} characters "
                              f"(server.max_stop_chars), got {chars}", param="stop")  # fmt: skip
        if req.stop_token_ids and len(req.stop_token_ids) > self.max_stop_token_ids:
            raise bad_request(f"stop_token_ids may hold at most {self.max_stop_token_ids} ids "
                              f"(server.max_stop_token_ids), got {len(req.stop_token_ids)}",
                              param="stop_token_ids")  # fmt: skip
        if req.temperature is not None and req.temperature > MAX_TEMPERATURE:
            raise bad_request(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {req.temperature}",
                              param="temperature")  # fmt: skip
        if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
            raise bad_request(f"seed must be an integer from {SEED_MIN} to {SEED_MAX} (64-bit), got a "
                              f"{len(str(abs(req.seed)))}-digit number", param="seed")  # fmt: skip
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")

    def check_sequences(self, num_prompts: int, n: int) -> None:
        """Prompts x n is how many sequences the request adds to the scheduler."""
        if num_prompts * n > self.max_seqs_per_request:
            raise bad_request(f"this request asks for {num_prompts * n} sequences ({num_prompts} prompts x n={n}); "
                              f"the limit is {self.max_seqs_per_request} (server.max_seqs_per_request): "
                              "split the prompts over several requests",
                              param="prompt" if num_prompts > 1 else "n")  # fmt: skip


def check_chat(req: P.ChatCompletionRequest) -> None:
    """Chat fields fxllm does not serve (tools) and messages a template cannot render."""
    for name in ("tools", "tool_choice", "functions", "function_call"):
        value = getattr(req, name)
        if value and value != "none":
            raise bad_request(f"{name} is not supported (this server does not call tools); leave it out",
                              param=name)  # fmt: skip
    for i, message in enumerate(req.messages):
        if message.content is None and message.role in _CONTENT_REQUIRED:
            raise bad_request(f"messages[{i}] (role {message.role!r}) must have content",
                              param=f"messages.{i}.content")  # fmt: skip


@contextmanager
def client_field_names(aliases: dict[str, str]) -> Iterator[None]:
    """Re-raise errors about internal field names with the names the client sent (max_completion_tokens...)."""
    try:
        yield
    except OpenAIError as exc:
        info = exc.info
        if info.param in aliases:
            for internal, sent in aliases.items():
                info.message = re.sub(rf"(?<![\w.]){internal}\b", sent, info.message)
            info.param = aliases[info.param]
        raise
