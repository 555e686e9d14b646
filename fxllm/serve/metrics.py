"""Prometheus metrics of one server (its own registry, never the global one), names prefixed `fxllm:`."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fxllm.runtime.outputs import RequestOutput

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    300.0,
)
_RATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
ENDPOINTS = {"/health", "/version", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class ServerMetrics:
    """Request counters, latency histograms and engine gauges, rendered at GET /metrics."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self.requests = Counter("fxllm:http_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=reg)  # fmt: skip
        self.request_success = Counter("fxllm:request_success", "Generation requests finished, by the first choice's finish reason.",
                                       [*labels, "finished_reason"], registry=reg)  # fmt: skip
        self.prompt_tokens = Counter(
            "fxllm:prompt_tokens", "Prompt tokens of generation requests.", labels, registry=reg
        )
        self.generation_tokens = Counter("fxllm:generation_tokens", "Tokens generated.", labels, registry=reg)
        self.ttft = Histogram("fxllm:time_to_first_token_seconds", "Time to first token (engine arrival to first token).",
                              labels, buckets=_TTFT_BUCKETS, registry=reg)  # fmt: skip
        self.itl = Histogram("fxllm:inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                             labels, buckets=_ITL_BUCKETS, registry=reg)  # fmt: skip
        self.e2e = Histogram("fxllm:e2e_request_latency_seconds", "Engine arrival to finish of a request.",
                             labels, buckets=_E2E_BUCKETS, registry=reg)  # fmt: skip
        self.kv_usage = Gauge(
            "fxllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", labels, registry=reg
        )
        self.prefix_hit_rate = Gauge("fxllm:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / queried.",
                                     labels, registry=reg)  # fmt: skip
        self.running = Gauge(
            "fxllm:num_requests_running", "Sequences running in the engine.", labels, registry=reg
        )
        self.waiting = Gauge(
            "fxllm:num_requests_waiting", "Sequences waiting to be scheduled.", labels, registry=reg
        )
        self.queue_time = Histogram("fxllm:request_queue_time_seconds",
                                    "Seconds a sequence waited from arrival until it was first scheduled.",
                                    labels, buckets=_TTFT_BUCKETS, registry=reg)  # fmt: skip
        # Speculative decoding (vLLM's spec_decode names), counted per finished request.
        self.spec_drafts = Counter("fxllm:spec_decode_num_drafts", "Speculative verify steps (sequence-steps with drafts).",
                                   labels, registry=reg)  # fmt: skip
        self.spec_draft_tokens = Counter("fxllm:spec_decode_num_draft_tokens", "Drafted tokens verified.",
                                         labels, registry=reg)  # fmt: skip
        self.spec_accepted_tokens = Counter("fxllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted.",
                                            labels, registry=reg)  # fmt: skip
        self.spec_acceptance = Histogram("fxllm:spec_decode_request_acceptance_rate",
                                         "Per request: accepted / drafted tokens (requests that drafted).",
                                         labels, buckets=_RATE_BUCKETS, registry=reg)  # fmt: skip
        self.spec_disabled_steps = Gauge("fxllm:spec_decode_disabled_steps",
                                         "Steps that did not speculate: more decoding sequences than speculative.disable_batch_size.",
                                         labels, registry=reg)  # fmt: skip
        self.spec_disabled_requests = Gauge("fxllm:spec_decode_disabled_requests",
                                            "Requests that backed off (drafted nothing a while): acceptance below speculative.min_acceptance_rate.",
                                            labels, registry=reg)  # fmt: skip
        self.spec_backoffs = Gauge("fxllm:spec_decode_backoffs", "Sequence backoffs for low acceptance (one may back off repeatedly).",
                                   labels, registry=reg)  # fmt: skip
        self.spec_steps_speculated = Gauge("fxllm:spec_decode_steps_speculated", "Steps that drafted tokens.",
                                           labels, registry=reg)  # fmt: skip
        self.spec_steps_skipped_cost = Gauge("fxllm:spec_decode_steps_skipped_cost",
                                             "Steps kept plain because verification would not pay (speculative.auto_disable).",
                                             labels, registry=reg)  # fmt: skip
        self.spec_steps_explored = Gauge("fxllm:spec_decode_steps_explored",
                                         "Steps run against the cost model's verdict to re-measure step times.",
                                         labels, registry=reg)  # fmt: skip

    def count_http(self, endpoint: str, status: int) -> None:
        """Count one HTTP response."""
        self.requests.labels(endpoint, str(status)).inc()

    def observe(self, output: RequestOutput) -> None:
        """Record a finished (or aborted) request's tokens and latencies."""
        name = self.model_name
        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(name).inc(sum(len(o.token_ids) for o in output.outputs))
        reasons = [c.finish_reason for c in output.outputs if c.finish_reason is not None]
        if output.finished and reasons:
            self.request_success.labels(name, reasons[0]).inc()
        metrics = output.metrics
        if metrics is None:
            return
        if metrics.ttft is not None:
            self.ttft.labels(name).observe(metrics.ttft)
        for gap in metrics.inter_token_latencies:
            self.itl.labels(name).observe(gap)
        if metrics.e2e_latency is not None:
            self.e2e.labels(name).observe(metrics.e2e_latency)
        if metrics.spec_draft_tokens:
            self.spec_drafts.labels(name).inc(metrics.spec_verify_steps)
            self.spec_draft_tokens.labels(name).inc(metrics.spec_draft_tokens)
            self.spec_accepted_tokens.labels(name).inc(metrics.spec_accepted_tokens)
            rate = metrics.spec_accepted_tokens / metrics.spec_draft_tokens
            self.spec_acceptance.labels(name).observe(rate)

    def observe_queue_time(self, seconds: float) -> None:
        """Record how long a sequence waited before it was first scheduled (any thread)."""
        self.queue_time.labels(self.model_name).observe(seconds)

    def update_engine_gauges(self, engine: Any) -> None:
        """Refresh the gauges from the engine (its stats, the live KV pool occupancy and queue lengths)."""
        stats = engine.stats
        kv = engine.kv_cache
        name = self.model_name
        self.kv_usage.labels(name).set(kv.num_used_blocks / kv.num_blocks if kv.num_blocks else 0.0)
        self.prefix_hit_rate.labels(name).set(stats.prefix_hit_rate)
        # The scheduler's live queue lengths, not the stats of the last step (stale between steps).
        self.running.labels(name).set(engine.scheduler.num_running)
        self.waiting.labels(name).set(engine.scheduler.num_waiting)
        speculator = getattr(engine, "speculator", None)
        if speculator is not None:
            spec = speculator.stats
            self.spec_disabled_steps.labels(name).set(spec.steps_disabled_batch)
            self.spec_disabled_requests.labels(name).set(spec.requests_disabled)
            self.spec_backoffs.labels(name).set(spec.backoffs)
            self.spec_steps_speculated.labels(name).set(spec.steps_speculated)
            self.spec_steps_skipped_cost.labels(name).set(spec.steps_skipped_cost)
            self.spec_steps_explored.labels(name).set(spec.steps_explored)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class ResponseCounter:
    """ASGI middleware counting responses by endpoint and status (no buffering: streams pass through)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Wrap `send` to count the response status once it starts."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_http(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
