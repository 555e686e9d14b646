"""The LLM API: `LLM(model).generate(prompts, SamplingParams(...))`, chat, and async streaming."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from fxllm.config import FxllmConfig, load_config
from fxllm.runtime.async_engine import AsyncEngine
from fxllm.runtime.builder import BuildInfo, build_engine
from fxllm.runtime.gc_heap import unfreeze_heap
from fxllm.runtime.outputs import RequestOutput
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


class LLM:
    """Offline and async generation over fxllm's engine; the model runs as the compiled graph only."""

    def __init__(
        self,
        model: str | torch.nn.Module | None = None,
        *,
        config: FxllmConfig | None = None,
        config_path: str | None = None,
        overrides: list[str] | None = None,
        tokenizer: Any = None,
        serving: bool = False,
    ) -> None:
        """`serving`: the engine answers a server's requests (latency-minded automatic batch limits)."""
        self.config = config or load_config(config_path, overrides)
        if model is None or isinstance(model, str):
            if model is not None:
                self.config.model.model = model
            self.engine, self.build_info = build_engine(self.config, serving=serving)
        else:
            self.engine, self.build_info = build_engine(
                self.config, model=model, tokenizer=tokenizer, serving=serving
            )
        self._async: AsyncEngine | None = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None for presets)."""
        return self.engine.tokenizer

    @property
    def info(self) -> BuildInfo:
        """What start-up did (timings, pass matches, op backends)."""
        return self.build_info

    def _check_sync(self) -> None:
        if self._async is not None:
            raise RuntimeError("this LLM is serving async requests; use generate_async, not generate")

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) at once; outputs in prompt order."""
        self._check_sync()
        batch = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        param_list = (
            list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(batch)
        )
        if len(param_list) != len(batch):
            raise ValueError(f"{len(param_list)} SamplingParams for {len(batch)} prompts")
        requests = [
            self.engine.build_request(p, sp) for p, sp in zip(batch, param_list)
        ]  # validate all first
        for request in requests:
            self.engine.add(request)
        finals = {out.request_id: out for out in self.engine.run_until_done()}
        return [finals[r.request_id] for r in requests]

    def apply_chat_template(self, messages: Messages) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with a raw prompt")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError("each message must be a dict with 'role' and 'content'")
            if message["role"] not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"unknown role {message['role']!r}; use system, user, assistant or tool")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def chat(
        self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)  # type: ignore[index]
        return self.generate([self.apply_chat_template(c) for c in conversations], params)  # type: ignore[arg-type]

    def async_engine(self) -> AsyncEngine:
        """The background-thread engine front (started on first use)."""
        if self._async is None:
            self._async = AsyncEngine(self.engine)
        return self._async

    async def generate_async(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        stream: bool = True,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive (of `params.output_kind`, cumulative by default), or the final one.

        With stream=False the engine is asked for the final output only (no per-step snapshots).
        """
        if not stream:
            params = dataclasses.replace(params or SamplingParams(), output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self.async_engine().generate(prompt, params, request_id):
            if stream:
                yield output
            final = output
        if not stream and final is not None:
            yield final

    def shutdown(self) -> None:
        """Stop the async engine thread, if started, and a tensor-parallel engine's worker processes."""
        if self._async is not None:
            self._async.shutdown()
            self._async = None
        stop_workers = getattr(self.engine.runner, "shutdown", None)
        if stop_workers is not None:
            stop_workers()
        if self.engine.heap_frozen:
            self.engine.heap_frozen = False
            unfreeze_heap()


def _is_token_list(prompts: object) -> bool:
    return isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(t, int) for t in prompts)
