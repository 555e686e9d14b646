"""The engine: one `step()` = schedule -> build inputs -> forward -> sample -> update."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from fxllm.runtime.async_step import LaunchedStep, remove_placeholders, timing_event
from fxllm.runtime.detokenizer import finish_reason_for_token
from fxllm.runtime.engine_setup import resolve_device_dtype, resolve_eos_token_ids
from fxllm.runtime.engine_stats import EngineStats
from fxllm.runtime.gc_heap import GcWindow, freeze_heap
from fxllm.runtime.kv_cache_manager import KVCacheManager
from fxllm.runtime.model_runner import ModelRunner
from fxllm.runtime.outputs import RequestOutput
from fxllm.runtime.prompt_logprobs import record_prompt_logprobs
from fxllm.runtime.request import Request, SequenceState
from fxllm.runtime.request_builder import build_request
from fxllm.runtime.sampler import Sampler
from fxllm.runtime.sampling_params import RequestOutputKind, SamplingParams
from fxllm.runtime.scheduler import CapacityScheduler, ScheduledSequence, SchedulerConfig, create_scheduler
from fxllm.runtime.sequence import SequenceStatus
from fxllm.runtime.speculative.decoder import SpeculativeDecoder, VerifiedRun, rollback_drafts
from fxllm.runtime.step_inputs import build_step_inputs

logger = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "EngineStats",
    "resolve_device_dtype",
    "resolve_eos_token_ids",
]  # set-up helpers re-exported


class Engine:
    """Synchronous engine over a ModelRunner; the async front and LLM API sit on top."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        scheduler_config: SchedulerConfig,
        *,
        enable_prefix_caching: bool = True,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: SequenceABC[int],
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        # Every id ends generation. As in vLLM, the first is "the" EOS (stop_reason None); the others
        # (a generation config's further EOS ids) join each request's stop_token_ids, so they end it
        # with stop_reason = the id and are held back under min_tokens like any stop token.
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.kv_cache = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler: CapacityScheduler = create_scheduler(scheduler_config, self.kv_cache)
        self.sampler = Sampler(eos_token_id=self.eos_token_id)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, tuple[Request, SequenceState]] = {}
        self._prompt_logit_seqs: set[int] = set()  # seq ids whose prompt logprobs are not all computed yet
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.stats = EngineStats()
        self._gc = GcWindow()
        self.heap_frozen = False  # the build froze the Python heap (scheduler.gc_freeze); shutdown undoes it
        self.compile_settled = False  # set by warmup: a varied round compiled nothing new
        # Async scheduling: launch step N+1 before reading step N's ids (see async_step.py). Default: on for
        # CUDA; on the CPU the forward runs on the host's cores, so there is nothing to overlap with.
        configured = scheduler_config.async_scheduling
        self.async_scheduling = runner.device.type == "cuda" if configured is None else configured
        self._in_flight: LaunchedStep | None = None
        # CUDA timing event at the end of the previous step's device work
        self._last_done: torch.cuda.Event | None = None
        self.speculator: SpeculativeDecoder | None = None  # speculative decoding (build_speculator sets it)

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a text prompt with the tokenizer's default special tokens."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompt token ids instead of text")
        return list(self.tokenizer(prompt).input_ids)

    def build_request(
        self,
        prompt: str | SequenceABC[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and build a request without touching engine state (safe from any thread)."""
        return build_request(self, prompt, params, request_id)

    def add(self, request: Request) -> None:
        """Queue a built request for scheduling."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.metrics.arrival_time = time.monotonic()
        for state in request.states:
            self.scheduler.add_sequence(state.seq)
            self._by_seq[state.seq.seq_id] = (request, state)
        if request.prompt_logprobs is not None and len(request.prompt_token_ids) > 1:
            self._prompt_logit_seqs.add(request.states[0].seq.seq_id)
        self.requests[request.request_id] = request
        self.stats.num_requests += 1
        self.stats.num_prompt_tokens += len(request.prompt_token_ids)

    def add_request(
        self,
        prompt: str | SequenceABC[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Validate, build and queue a request; returns its id."""
        request = self.build_request(prompt, params, request_id)
        self.add(request)
        return request.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for state in request.states:
            if state.finish_reason is None:
                self.scheduler.abort_sequence(state.seq.seq_id)
                state.finish_reason = "abort"
            self._by_seq.pop(state.seq.seq_id, None)
            self._prompt_logit_seqs.discard(state.seq.seq_id)
        self.stats.num_aborted += 1
        request.metrics.finished_time = time.monotonic()
        return request.output()

    def has_unfinished(self) -> bool:
        """Whether any request is still queued or running."""
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, *, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduling step; returns outputs of requests that progressed (or only finished ones).

        Each output is of its request's `output_kind`: FINAL_ONLY requests (and every request with
        finished_only, as offline generation wants) give one when they finish; DELTA ones only what is new.
        With async scheduling a step launches the next forward before reading the previous step's
        sampled ids, so the outputs it returns are those of the previous step.
        """
        stats, clock = self.stats, time.perf_counter
        t0 = clock()
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.needs_host_history():
            outputs += self._read_step(
                previous, finished_only
            )  # penalties read the token history on the host
            previous = None
        placeholders = previous.add_placeholders() if previous is not None else []
        launched = None
        try:
            if self.speculator is not None:
                self.speculator.propose(self)  # drafts ride on the decodes the scheduler picks
            scheduled = self.scheduler.schedule()
            stats.num_preemptions += len(scheduled.preempted)
            stats.schedule_seconds += clock() - t0
            if not scheduled.is_empty:
                launched = self._launch(scheduled.scheduled, previous)
        finally:
            remove_placeholders(placeholders)
        if previous is not None:
            outputs += self._read_step(previous, finished_only)
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs += self._read_step(launched, finished_only)
            t = clock()
            for item in launched.scheduled:  # after the reads: every token up to num_computed is known
                if not item.seq.status.is_finished:
                    self.kv_cache.cache_full_blocks(item.seq)
            stats.update_seconds += clock() - t
        if self.speculator is not None:  # the step's wall time feeds the speculate-or-not cost model
            self.speculator.end_step(launched.scheduled if launched is not None else [])
        if not self.requests:  # what is still in flight belongs to finished requests only
            self._in_flight = self._last_done = None
        self._refresh_gauges()
        return outputs

    def _launch(self, scheduled: list[ScheduledSequence], previous: LaunchedStep | None) -> LaunchedStep:
        """Build the inputs, run the forward and launch sampling; the sampled ids stay in flight."""
        stats, clock = self.stats, time.perf_counter
        t1 = clock()
        start = timing_event(self.runner.device)
        pending = (
            (previous.pending_rows(), previous.sample.token_ids)
            if previous and previous.sample
            else (None, None)
        )
        inputs = build_step_inputs(scheduled, self.runner.block_size, self.runner.device, *pending,
                                   prompt_logits=self._prompt_logit_seqs)  # fmt: skip
        t2 = clock()
        logits = self.runner.execute(inputs)
        t3 = clock()
        num_rows = inputs.num_sample_rows  # 1 + drafts rows per sequence that verifies
        if inputs.prompt_rows:
            self._record_prompt_logprobs(scheduled, inputs.prompt_rows, logits[num_rows:])
            logits = logits[:num_rows]
        rows = []
        states = []
        by_seq = self._by_seq
        for index in inputs.sampled:
            request, state = entry = by_seq[scheduled[index].seq.seq_id]
            states.append(entry)
            rows.append(state.sampler_row(request.params))
        verifying = self.speculator is not None and any(inputs.draft_counts)
        if verifying:
            seqs = [scheduled[index].seq for index in inputs.sampled]
            sample = self.speculator.launch(self.sampler, logits, rows, seqs, inputs.draft_counts)  # type: ignore[union-attr]
        else:
            sample = self.sampler.launch(logits, rows) if rows else None
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        if self.speculator is not None:
            rollback_drafts(scheduled)  # rejected drafts' K/V stay past num_computed_tokens, unreferenced
        done = timing_event(self.runner.device)
        step = LaunchedStep(scheduled, states, sample, start=start, done=done, previous_done=self._last_done)
        self._last_done = done
        stats.num_steps += 1
        stats.inputs_seconds += t2 - t1
        stats.forward_seconds += t3 - t2
        stats.sample_seconds += step.launched_at - t3
        return step

    def _record_prompt_logprobs(self, scheduled: list[ScheduledSequence], rows: list[Any], logits: torch.Tensor) -> None:  # fmt: skip
        """Prompt logprobs of this step's chunks (read to the host now: only steps that carry such rows)."""
        start = 0
        for index, first, count in rows:
            seq = scheduled[index].seq
            chunk = logits[start : start + count]
            record_prompt_logprobs(self._by_seq[seq.seq_id][0], seq.token_ids, first, chunk, self.tokenizer)
            start += count
            if first + count >= seq.num_prompt_tokens - 1:
                self._prompt_logit_seqs.discard(seq.seq_id)

    def _read_step(self, step: LaunchedStep, finished_only: bool) -> list[RequestOutput]:
        """Wait for a launched step's sampled ids and append them; returns the outputs that step produced."""
        stats, clock = self.stats, time.perf_counter
        t = clock()
        stats.overlap_seconds += t - step.launched_at
        sampled = step.sample.resolve() if step.sample is not None else None
        t4 = clock()
        stats.result_wait_seconds += t4 - t
        stats.sample_seconds += t4 - t
        if step.start is not None and step.previous_done is not None:
            stats.gpu_idle_seconds += max(0.0, step.previous_done.elapsed_time(step.start) / 1000)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for j, (request, state) in enumerate(step.rows):
            if not step.alive(state):
                continue  # finished or aborted after this step was launched: its extra token is dropped
            assert sampled is not None
            token = sampled.token_ids[j]
            if isinstance(token, VerifiedRun):
                self.speculator.append_run(self, request, state, token, now)  # type: ignore[union-attr]
            else:
                self._append_token(request, state, token, sampled.logprobs[j], now)
            touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            finished = request.finished
            if finished or not (finished_only or request.params.output_kind is RequestOutputKind.FINAL_ONLY):
                outputs.append(request.output())
            if finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
                self.stats.num_finished += 1
        stats.update_seconds += clock() - t4
        return outputs

    def _append_token(
        self, request: Request, state: SequenceState, token: int, logprobs: Any, now: float
    ) -> None:
        seq, params = state.seq, request.params
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            request.metrics.num_cached_tokens = seq.num_cached_tokens
        elif state.last_token_time is not None:
            request.metrics.inter_token_latencies.append(now - state.last_token_time)
        state.last_token_time = now
        seq.append_token(token)
        self.stats.num_generated_tokens += 1
        if state.logprobs is not None and logprobs is not None:
            for lp in logprobs.values():
                lp.decoded = self.tokenizer.decode([lp.token_id]) if self.tokenizer else None
            state.logprobs.append(logprobs)
            state.cumulative_logprob += logprobs[token].logprob
        reason = finish_reason_for_token(
            token, seq.num_output_tokens, params, self.eos_token_id, state.max_tokens
        )
        det = state.detokenizer
        if det is not None:
            if reason is None or reason[0] == "length" or params.include_stop_str_in_output:
                det.append(token)
            stop_string = det.check_stop()
            # A stop string beats the length limit (as in vLLM): its text is already cut off, so
            # reporting "length" would hand out a truncated text with the wrong reason.
            if stop_string is not None and (reason is None or reason[0] == "length"):
                reason = ("stop", stop_string)
        if reason is not None:
            # Before the finish frees the blocks, they stay reusable by prefix (`step` caches the rest).
            self.kv_cache.cache_full_blocks(seq)
            state.finish_reason, state.stop_reason = reason
            seq.status = (
                SequenceStatus.FINISHED_LENGTH if reason[0] == "length" else SequenceStatus.FINISHED_STOPPED
            )
            self.scheduler.finish_sequence(seq)
            self._by_seq.pop(seq.seq_id, None)
        if det is not None:
            det.safe_delta(final=state.finish_reason is not None)  # outputs read the released text

    def _refresh_gauges(self) -> None:
        kv = self.kv_cache.stats
        self.stats.num_running = self.scheduler.num_running
        self.stats.num_waiting = self.scheduler.num_waiting
        self.stats.kv_usage = kv.usage
        self.stats.prefix_hit_rate = kv.hit_rate
        self.stats.prefix_hit_tokens = kv.num_hit_tokens
        self.stats.prefix_queried_tokens = kv.num_queried_tokens
        self.stats.gc_full_collections, self.stats.gc_pause_seconds = self._gc.since()

    def freeze_heap(self) -> None:
        """Freeze the Python heap built so far (gc_heap.py); its collection is not the user's pause."""
        freeze_heap()
        self.heap_frozen = True
        self._gc.reset()

    def warmup(self) -> float:
        """Run tiny requests through every step kind so compilation happens now, not on a user's first
        request; then forget them (stats, prefix cache). Returns the seconds it took.

        A second round (two sequences of other lengths) must need no new compile; then
        `compile_settled` is True and the builder may switch Dynamo's guard checks off."""
        start = time.perf_counter()
        greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        self._run_warmup("first", [[0, 1, 2]], greedy)
        self._run_mixed_warmup()
        compiles = self.runner.num_compiles
        if compiles is not None:
            longest = max(1, min(20, self.max_model_len - greedy.max_tokens))
            for round_ in range(2):
                self._run_warmup(f"check{round_}", [[3] * min(5, longest), [4] * longest], greedy)
                if self.runner.num_compiles == compiles:
                    self.compile_settled = True
                    break
                compiles = self.runner.num_compiles
            else:
                logger.warning("the compiled graph kept recompiling during warm-up; Dynamo guards stay on")
        self.kv_cache.reset_prefix_cache()
        self.stats = EngineStats()
        self._gc.reset()
        if self.speculator is not None:
            self.speculator.reset_stats()  # warm-up drafts are not the user's
        return time.perf_counter() - start

    def _run_mixed_warmup(self) -> None:
        """One step where a sequence decodes while another prefills: its kernels (the attention op splits such
        a step between its decode and prefill kernels) compile here, not in a user's first busy moment."""
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        self.add_request([5, 6, 7], params, "fxllm-warmup-mixed-0")
        self.step()
        self.add_request([8, 9, 10, 11], params, "fxllm-warmup-mixed-1")
        self.run_until_done()

    def _run_warmup(self, name: str, prompts: list[list[int]], params: SamplingParams) -> None:
        for i, prompt in enumerate(prompts):
            self.add_request(prompt, params, f"fxllm-warmup-{name}-{i}")
        self.run_until_done()

    def run_until_done(self) -> list[RequestOutput]:
        """Step until every queued request finishes; returns the final outputs."""
        finals: list[RequestOutput] = []
        while self.has_unfinished():
            finals += self.step(finished_only=True)
        return finals
