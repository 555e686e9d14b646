"""Section `llama8b` of benchmarks/gpu.py: the Llama-3.1-8B preset (bf16, random weights) end to end.

In one process: HF eager (logits, batch-1 decode, batched throughput), `fxllm.compile` (time and
logits vs HF), then the fxllm engine (start-up broken down, batch-1 decode, offline throughput
scenarios). Every scenario checks the time left first and records a skip instead of overrunning.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import logging
import pstats
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from roofline import ModelShape, ideal_seconds

from fxllm.serve.bench_offline import fxllm_decode_rate, fxllm_throughput, hf_generate_seconds, random_prompts

logger = logging.getLogger("fxllm.gpu.llama8b")

PRESET = "llama-3.1-8b"
# Weights-over-bandwidth limit of batch-1 decode on an H100 SXM, as stated in issue 5.
BATCH1_LIMIT_TOK_S = 188.0
# Peak memory bandwidth (TB/s) of the cards the device tool lends, to scale that limit to the card
# a run gets (an H200 run divided by the H100 figure reported 103% of the limit).
CARD_BANDWIDTH_TBS = {"H100": 3.35, "H200": 4.8}


def batch1_limit_tok_s(device_name: str) -> float | None:
    """Issue 5's H100 limit scaled by this card's peak bandwidth; None for a card not in the table."""
    for card, tbs in CARD_BANDWIDTH_TBS.items():
        if card in device_name:
            return BATCH1_LIMIT_TOK_S * tbs / CARD_BANDWIDTH_TBS["H100"]
    return None


# (requests, input tokens, output tokens): issue 5's offline throughput scenarios. 128/2048 and
# 2048/128 use fewer requests so that the whole section fits one device call; the count is recorded.
THROUGHPUT_SCENARIOS = [(1000, 128, 128), (128, 128, 2048), (256, 2048, 128)]


def _hf_section(model: Any, vocab: int) -> dict[str, Any]:
    prompt = random_prompts(1, 128, vocab, 1)
    hf_generate_seconds(model, prompt, 2)  # warm-up
    first = hf_generate_seconds(model, prompt, 1)
    full = hf_generate_seconds(model, prompt, 65)
    batch = random_prompts(64, 128, vocab, 2)
    seconds = hf_generate_seconds(model, batch, 128)
    return {
        "batch1_decode_tok_s": 64 / (full - first),
        "throughput_64x128x128_tok_s": 64 * 128 / seconds,
        "throughput_64x128x128_seconds": seconds,
    }


@torch.inference_mode()
def _compile_section(model: Any, vocab: int) -> dict[str, Any]:
    from fxllm.compiler import compile_model

    ids = torch.tensor(random_prompts(1, 128, vocab, 3), device="cuda")
    ref = model(ids).logits.float()
    start = time.perf_counter()
    compiled = compile_model(model, backend="inductor")
    got = compiled(ids).float()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del compiled
    gc.collect()  # the compiled graph holds merged copies of the q/k/v and gate/up weights
    torch.cuda.empty_cache()
    # The tolerance is relative to what bf16 itself costs: HF eager bf16 and fxllm bf16 are both
    # compared with HF eager in float32 on the same (upcast) weights.
    model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    ref32 = model(ids).logits.float()  # the caller drops the model after this section

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    def top1(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    return {"compile_seconds_incl_first_call": seconds, "fxllm_vs_hf_bf16_rel_err": rel(got, ref),
            "fxllm_bf16_vs_hf_fp32_rel_err": rel(got, ref32), "hf_bf16_vs_hf_fp32_rel_err": rel(ref, ref32),
            "top1_fxllm_vs_hf_bf16": top1(got, ref), "top1_fxllm_bf16_vs_fp32": top1(got, ref32),
            "top1_hf_bf16_vs_fp32": top1(ref, ref32), "max_abs_err_vs_hf_bf16": (got - ref).abs().max().item(),
            "ref_logit_std": ref.std().item()}  # fmt: skip


def _phases(stats: Any) -> dict[str, float]:
    return {
        name: getattr(stats, f"{name}_seconds")
        for name in (
            "schedule",
            "inputs",
            "forward",
            "sample",
            "update",
            "result_wait",
            "overlap",
            "gpu_idle",
        )
    }


class _CaptureProfile:
    """cProfile of DecodeGraphs.capture_all (where CUDA-graph capture time goes), top functions as text."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()

    def text(self, top: int = 30) -> str:
        buffer = io.StringIO()
        pstats.Stats(self.profile, stream=buffer).sort_stats("cumulative").print_stats(top)
        return buffer.getvalue()[-6000:]


@contextlib.contextmanager
def _profiled_capture() -> Iterator[_CaptureProfile]:
    from fxllm.runtime import cuda_graphs

    result = _CaptureProfile()
    original = cuda_graphs.DecodeGraphs.capture_all

    def capture_all(self: Any) -> float:
        result.profile.enable()
        try:
            return original(self)
        finally:
            result.profile.disable()

    cuda_graphs.DecodeGraphs.capture_all = capture_all  # type: ignore[method-assign]
    try:
        yield result
    finally:
        cuda_graphs.DecodeGraphs.capture_all = original  # type: ignore[method-assign]


def _replay_ms(runner: Any, bucket_size: int, iters: int = 50) -> float | None:
    """GPU time of one captured decode graph (no host work): the step's device-side floor."""
    graphs = runner.decode_graphs
    bucket = next((b for b in graphs.buckets if b.size == bucket_size), None) if graphs else None
    if bucket is None or bucket.graph is None:
        return None
    bucket.graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        bucket.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _engine_section(
    deadline: float, save: Callable[[dict[str, Any]], None], out: dict[str, Any], shape: ModelShape
) -> None:
    from fxllm.config import load_config
    from fxllm.llm import LLM
    from fxllm.runtime.sampling_params import SamplingParams

    # Scheduler limits are left automatic: on CUDA they come from the KV pool (issue 14, item 3).
    config = load_config(None, [f"model.model={PRESET}", "model.device=cuda", "model.dtype=bfloat16",
                                "model.max_model_len=4096"])  # fmt: skip
    free_before, _ = torch.cuda.mem_get_info()
    start = time.perf_counter()
    with _profiled_capture() as capture_profile:
        llm = LLM(config=config)
    info = llm.info
    out["engine_start"] = {
        "total_seconds": time.perf_counter() - start, "load": info.load_seconds, "capture": info.capture_seconds,
        "passes": info.passes_seconds, "compile_and_warmup": info.warmup_seconds,
        "cuda_graphs": info.decode_graph_seconds, "graph_batch_sizes": list(info.decode_graph_sizes),
        "kv_capacity_tokens": llm.engine.runner.capacity_tokens, "op_backends": dict(info.op_backends),
        "max_num_seqs": llm.engine.scheduler.config.max_num_seqs,
        "max_num_batched_tokens": llm.engine.scheduler.config.max_num_batched_tokens,
        "bucket_seconds": {b.size: b.setup_seconds for b in llm.engine.runner.decode_graphs.buckets}
        if llm.engine.runner.decode_graphs else None,
        "gpu_free_gib_before_start": free_before / 2**30, "capture_profile_top": capture_profile.text(),
    }  # fmt: skip
    save(out)
    vocab = llm.engine.vocab_size
    llm.generate(
        [random_prompts(1, 128, vocab, 4)[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    rate = fxllm_decode_rate(llm, random_prompts(1, 128, vocab, 5)[0], 257).tokens_per_second  # 256 decoded
    replay = _replay_ms(llm.engine.runner, 1)
    limit = batch1_limit_tok_s(torch.cuda.get_device_name())
    out["batch1_decode"] = {
        "tok_s": rate, "fraction_of_limit": rate / limit if limit else None, "limit_tok_s": limit,
        "graph_replay_ms": replay, "step_ms": 1000 / rate,
    }  # fmt: skip
    for size in (64, 256):
        out["batch1_decode"][f"graph_replay_ms_b{size}"] = _replay_ms(llm.engine.runner, size)
    save(out)
    for index, (num, input_len, output_len) in enumerate(THROUGHPUT_SCENARIOS):
        key = f"throughput_{num}x{input_len}x{output_len}"
        left = deadline - time.perf_counter()
        if left < 60:
            out[key] = {"skipped": f"only {left:.0f} s of the device call left"}
            continue
        prompts = random_prompts(num, input_len, vocab, 10 + index)  # no prefix shared across scenarios
        steps_before = llm.engine.stats.num_steps
        phases_before = _phases(llm.engine.stats)
        torch.cuda.synchronize()
        result = fxllm_throughput(llm, prompts, output_len)
        out[key] = {"output_tok_s": result.tokens_per_second, "seconds": result.seconds,
                    "output_tokens": result.output_tokens,
                    "steps": llm.engine.stats.num_steps - steps_before,
                    "preemptions": llm.engine.stats.num_preemptions,
                    "phase_seconds": {k: v - phases_before[k] for k, v in _phases(llm.engine.stats).items()}}  # fmt: skip
        ideal = ideal_seconds(shape, num, input_len, output_len, llm.engine.scheduler.config.max_num_seqs,
                              torch.cuda.get_device_name())  # fmt: skip
        if ideal is not None:
            out[key]["roofline"] = {**ideal, "fraction": result.tokens_per_second / ideal["out_tok_s"]}
        # Host time not overlapped with the GPU (EngineStats docs): GPU idle gaps between steps (CUDA events)
        # and the host's wait for each step's sampled ids, per step.
        steps, phases = max(1, out[key]["steps"]), out[key]["phase_seconds"]
        out[key]["async_scheduling"] = llm.engine.async_scheduling
        out[key]["gpu_idle_ms_per_step"] = 1000 * phases["gpu_idle"] / steps
        out[key]["result_wait_ms_per_step"] = 1000 * phases["result_wait"] / steps
        logger.info(
            "%s: %.0f out tok/s, %d steps; GPU idle %.3f ms/step, host waiting %.3f ms/step (async scheduling %s)",
            key, result.tokens_per_second, steps, out[key]["gpu_idle_ms_per_step"],
            out[key]["result_wait_ms_per_step"], "on" if llm.engine.async_scheduling else "off",
        )  # fmt: skip
        graphs = llm.engine.runner.decode_graphs
        if graphs is not None:
            out[key]["graph_replays_total"] = graphs.num_replays
            out[key]["too_large_total"] = graphs.num_too_large
        save(out)
    llm.shutdown()


def run_llama8b(deadline: float, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """HF eager, fxllm.compile and the engine on the 8B preset; `save` is called as results come in."""
    from fxllm.models import load_model

    out: dict[str, Any] = {}
    start = time.perf_counter()
    model = load_model(PRESET, device="cuda", dtype=torch.bfloat16, seed=0).model
    out["hf_load_seconds"] = time.perf_counter() - start
    vocab = int(model.config.vocab_size)
    # Every matmul weight a decode step reads (the LM head included, the embedding table not).
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    shape = ModelShape.from_hf_config(model.config, linear_params)
    out["hf_eager"] = _hf_section(model, vocab)
    save(out)
    out["fxllm_compile"] = _compile_section(model, vocab)
    save(out)
    del model
    # Dynamo's caches keep the HF model (upcast to float32 above, 32 GB) alive; without the reset the
    # engine's KV pool was planned around it (173k tokens instead of ~400k on the H100).
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    _engine_section(deadline, save, out, shape)
    hf_b1 = out["hf_eager"]["batch1_decode_tok_s"]
    hf_tp = out["hf_eager"]["throughput_64x128x128_tok_s"]
    out["ratios"] = {"batch1_decode_vs_hf": out["batch1_decode"]["tok_s"] / hf_b1}
    tp = out.get("throughput_1000x128x128", {}).get("output_tok_s")
    if tp:
        out["ratios"]["throughput_1000x128x128_vs_hf_batch64"] = tp / hf_tp
    return out
