"""`fxllm bench`: offline throughput and batch-1 decode latency, fxllm against HF eager in one run."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from fxllm.config import FxllmConfig
from fxllm.llm import LLM
from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """One measured row: what ran, how many tokens, how fast."""

    system: str  # "fxllm" or "hf-eager"
    scenario: str  # "batch1-decode" or "throughput-cN"
    output_tokens: int
    seconds: float
    tokens_per_second: float


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`num` seeded random prompts of `length` token ids (the GPU benchmarks use them too)."""
    generator = torch.Generator().manual_seed(seed)
    # Skip the first ids: many vocabularies keep special tokens there.
    return [torch.randint(100, vocab, (length,), generator=generator).tolist() for _ in range(num)]


def read_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Host memory read bandwidth now, in GB/s: the best of `repeats` sums over a fresh buffer.

    Batch-1 decode on the CPU reads every weight once per token, so its speed follows this
    number, which on a shared VM moves by tens of percent between runs; HF eager's batch-1 speed
    is bound by per-op overhead and does not. Logged around the fxllm runs to read ratios by.
    """
    if megabytes <= 0 or repeats <= 0:
        raise ValueError("megabytes and repeats must be positive")
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def fxllm_decode_rate(llm: LLM, prompt: list[int], output_len: int) -> BenchResult:
    """One request alone: decode tok/s from its first token to its last."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    metrics = out.metrics
    assert metrics is not None and metrics.first_token_time is not None and metrics.finished_time is not None
    decode_seconds = metrics.finished_time - metrics.first_token_time
    return BenchResult(
        "fxllm", "batch1-decode", output_len - 1, decode_seconds, (output_len - 1) / decode_seconds
    )


def fxllm_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> BenchResult:
    """All prompts submitted at once: output tok/s over the whole run."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return BenchResult("fxllm", f"throughput-c{len(prompts)}", tokens, seconds, tokens / seconds)


@torch.inference_mode()
def hf_generate_seconds(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Wall seconds of one HF `generate` of exactly `new_tokens` tokens over the batch."""
    ids = torch.tensor(prompts, device=model.device)

    def sync() -> None:
        if ids.is_cuda:
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)  # fmt: skip
    sync()
    return time.perf_counter() - start


def _hf_results(
    model: Any, prompt: list[int], prompts: list[list[int]], output_len: int
) -> list[BenchResult]:
    hf_generate_seconds(model, [prompt], 2)  # warm-up
    first = hf_generate_seconds(model, [prompt], 1)
    full = hf_generate_seconds(model, [prompt], output_len)
    decode = max(full - first, 1e-9)
    rows = [BenchResult("hf-eager", "batch1-decode", output_len - 1, decode, (output_len - 1) / decode)]
    seconds = hf_generate_seconds(model, prompts, output_len)
    tokens = len(prompts) * output_len
    rows.append(BenchResult("hf-eager", f"throughput-c{len(prompts)}", tokens, seconds, tokens / seconds))
    return rows


def run_offline_bench(
    config: FxllmConfig,
    *,
    input_len: int,
    output_len: int,
    concurrency: int,
    skip_hf: bool = False,
    seed: int = 0,
) -> list[BenchResult]:
    """Measure fxllm and (unless skipped) HF eager on the same prompts, model and dtype."""
    llm = LLM(config.model.model, config=config)
    vocab = llm.engine.vocab_size
    prompts = random_prompts(concurrency, input_len, vocab, seed)
    # Warm-up prompts of their own: measured prompts must not find their blocks in the prefix cache.
    warmup = random_prompts(2, input_len, vocab, seed + 1)
    single = random_prompts(1, input_len, vocab, seed + 2)[0]  # the batch-1 request, not reused below
    logger.info("warming up fxllm (compiles the shapes the benchmark uses)")
    llm.generate(warmup, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    llm.generate(warmup[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    device = llm.info.device
    before = read_bandwidth_gbs() if device.type == "cpu" else None
    engine = llm.engine
    speculator, engine.speculator = engine.speculator, None  # plain decoding first, as configured otherwise
    if speculator is not None:
        engine.async_scheduling = speculator.async_was_on
    rows = [fxllm_decode_rate(llm, single, output_len), fxllm_throughput(llm, prompts, output_len)]
    if speculator is not None:  # `--speculative`: the same runs again with it, in this process
        engine.speculator, engine.async_scheduling = speculator, False
        engine.kv_cache.reset_prefix_cache()
        name = f"fxllm-{speculator.config.method}"
        spec_rows = [fxllm_decode_rate(llm, single, output_len), fxllm_throughput(llm, prompts, output_len)]
        rows += [replace(r, system=name) for r in spec_rows]
        stats = speculator.stats
        logger.info("speculative %s: %d of %d drafted tokens accepted (%.2f); steps: %d drafted, %d plain by cost "
                    "(auto_disable=%s), %d explored, %d plain for batch > %d; %d backoffs of %d requests",
                    speculator.config.method, stats.accepted_tokens, stats.draft_tokens, stats.acceptance_rate,
                    stats.steps_speculated, stats.steps_skipped_cost, speculator.config.auto_disable,
                    stats.steps_explored, stats.steps_disabled_batch, speculator.config.disable_batch_size,
                    stats.backoffs, stats.requests_disabled)  # fmt: skip
    if before is not None:
        logger.info("host memory read bandwidth: %.1f GB/s before the fxllm runs, %.1f GB/s after "
                    "(batch-1 decode follows it)", before, read_bandwidth_gbs())  # fmt: skip
    dtype = llm.info.dtype
    llm.shutdown()
    del llm
    if not skip_hf:
        from fxllm.models import load_model

        hf = load_model(config.model.model, device=device, dtype=dtype, seed=config.model.seed,
                        num_layers=config.model.num_layers).model  # fmt: skip
        rows += _hf_results(hf, single, prompts, output_len)
    return rows


def format_results(rows: list[BenchResult]) -> str:
    """A table with fxllm/HF ratios per scenario."""
    lines = [f"{'system':<16}{'scenario':<18}{'tokens':>8}{'seconds':>10}{'tok/s':>10}"]
    for r in rows:
        lines.append(
            f"{r.system:<16}{r.scenario:<18}{r.output_tokens:>8}{r.seconds:>10.2f}{r.tokens_per_second:>10.1f}"
        )
    by = {(r.system, r.scenario): r.tokens_per_second for r in rows}
    for (system, scenario), rate in by.items():
        if system == "fxllm" and ("hf-eager", scenario) in by:
            lines.append(f"ratio fxllm/hf {scenario}: {rate / by[('hf-eager', scenario)]:.2f}x")
        if system.startswith("fxllm-") and ("fxllm", scenario) in by:  # speculative vs plain, same process
            lines.append(f"ratio {system}/fxllm {scenario}: {rate / by[('fxllm', scenario)]:.2f}x")
    return "\n".join(lines)


def results_json(rows: list[BenchResult]) -> str:
    """Machine-readable results."""
    return json.dumps([asdict(r) for r in rows], indent=2)
