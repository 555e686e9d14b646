"""`FxllmDynamoEngine`: Dynamo's `LLMEngine` contract over fxllm's async engine.

Dynamo's frontend tokenizes (chat template included), routes and detokenizes; this worker takes the
token ids, maps the sampling options and token-level stop conditions to SamplingParams, streams the new
token ids, and aborts the request (freeing its KV blocks) when Dynamo cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from dynamo.common.backend import EngineConfig, LLMEngine, WorkerConfig
from dynamo.common.backend.engine import LlmRegistration
from dynamo.common.backend.publisher import KvEventSource, PushSource
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument

from fxllm.config import FxllmConfig
from fxllm.dynamo.args import WorkerOptions, parse
from fxllm.dynamo.kv_events import EventPublisherThread, FxllmLoadCollector, KVEventQueue, LoadSnapshot
from fxllm.dynamo.requests import prompt_token_ids, to_chunk, to_sampling_params

if TYPE_CHECKING:
    from dynamo._core import Context

    from fxllm.llm import LLM

logger = logging.getLogger(__name__)


class FxllmDynamoEngine(LLMEngine):
    """One fxllm engine serving Dynamo requests; KV events and load go out through Dynamo's publishers."""

    def __init__(self, config: FxllmConfig, options: WorkerOptions) -> None:
        self.config = config
        self.options = options
        self.llm: LLM | None = None
        self.kv_events = KVEventQueue()
        self.publisher = EventPublisherThread(self.kv_events, self._load)
        self._closed = False

    @classmethod
    async def from_args(cls, argv: list[str] | None = None) -> tuple[FxllmDynamoEngine, WorkerConfig]:
        """Parse `python -m fxllm.dynamo` flags into the engine (not started) and Dynamo's WorkerConfig."""
        config, options = parse(argv)
        worker_config = WorkerConfig(
            namespace=options.namespace,
            component=options.component,
            endpoint=options.endpoint,
            model_name=str(options.model_path),
            served_model_name=options.served_model_name,
            endpoint_types=options.endpoint_types,
            discovery_backend=options.discovery_backend,
            request_plane=options.request_plane,
            event_plane=options.event_plane,
            enable_kv_routing=options.enable_kv_routing,
        )
        return cls(config, options), worker_config

    async def start(self, worker_id: int) -> EngineConfig:
        """Write the frontend's model folder if needed, build the engine (compile + warm-up) off the event
        loop, then hook the prefix cache's events."""
        del worker_id  # Dynamo's publishers carry it
        if self.options.export_model_path:
            from fxllm.dynamo.model_folder import export_model_folder_once

            await asyncio.to_thread(
                export_model_folder_once, self.config.model.model, self.options.model_path
            )
        from fxllm.llm import LLM

        self.llm = await asyncio.to_thread(LLM, self.config.model.model, config=self.config, serving=True)
        engine = self.llm.engine
        engine.kv_cache.observers.append(self.kv_events)  # after warm-up, which resets the prefix cache
        self.llm.async_engine()
        scheduler = engine.scheduler.config
        logger.info("fxllm worker ready: %s as %r, KV %d blocks x %d tokens, context %d",
                    self.config.model.model, self.options.served_model_name, engine.kv_cache.num_blocks,
                    engine.kv_cache.block_size, engine.max_model_len)  # fmt: skip
        return EngineConfig(
            model=str(self.options.model_path),
            served_model_name=self.options.served_model_name,
            llm=LlmRegistration(
                context_length=engine.max_model_len,
                kv_cache_block_size=engine.kv_cache.block_size,
                total_kv_blocks=engine.kv_cache.num_blocks,
                max_num_seqs=scheduler.max_num_seqs,
                max_num_batched_tokens=scheduler.max_num_batched_tokens,
            ),
        )

    async def generate(
        self, request: dict[str, Any], context: Context
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Stream one request's new token ids; the last chunk has finish_reason and completion_usage."""
        if self.llm is None or self._closed:
            raise EngineShutdown("the fxllm engine is not running")
        try:
            token_ids = prompt_token_ids(request)
            params = to_sampling_params(request)
            outputs = self.llm.async_engine().generate(token_ids, params, request_id=context.id())
            first = await anext(outputs)  # validation errors raise here, before any token
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        except StopAsyncIteration:
            return
        generated = 0
        output = first
        try:
            while True:
                generated += len(output.outputs[0].token_ids) if output.outputs else 0
                yield to_chunk(output, generated)
                if output.finished:
                    return
                output = await anext(outputs)
        except StopAsyncIteration:
            return
        finally:
            await outputs.aclose()  # an unfinished request is aborted there: its KV blocks are freed

    async def abort(self, context: Context) -> None:
        """Abort the request (its KV blocks return to the pool); unknown or finished ids are ignored."""
        if self.llm is not None:
            self.llm.async_engine().abort(context.id())

    async def cleanup(self) -> None:
        """Stop publishing and the engine thread (null-safe, idempotent)."""
        self._closed = True
        self.publisher.stop()
        if self.llm is not None:
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)

    async def kv_event_sources(self) -> list[KvEventSource]:
        """One push source: the worker hands over its KvEventPublisher and our thread drives it."""
        return [PushSource(on_ready=self.publisher.start, dp_rank=0)]

    def component_metrics_dp_ranks(self) -> list[int]:
        """One rank: this worker's engine."""
        return [0]

    def attach_snapshot_publisher(self, publisher: Any) -> None:
        """Load snapshots (KV blocks used and total, hit rate) go to `publisher` from our thread."""
        self.publisher.snapshot_publisher = publisher

    async def register_prometheus(self, metrics: Any) -> None:
        """Bridge the `fxllm:` load gauges into the worker's /metrics."""
        from dynamo.common.backend.metrics import register_engine_registry
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(FxllmLoadCollector(self._load))
        register_engine_registry(metrics, registry, prefix_filters=["fxllm:"])

    async def health_check_payload(self) -> dict[str, Any] | None:
        """A one-token canary from the BOS id."""
        from dynamo.common.backend.health_check import bos_token_id_or, build_health_check_payload

        tokenizer = self.llm.tokenizer if self.llm is not None else None
        return build_health_check_payload(bos_token_id=bos_token_id_or(tokenizer))

    def _load(self) -> LoadSnapshot:
        if self.llm is None:
            return LoadSnapshot(0, 0, 0, 0, 0.0, None, 0, 0, 0)
        return LoadSnapshot.of(self.llm.engine)
