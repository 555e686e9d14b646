"""Loops shared by the speculative GPU benchmarks (gpu_speculative.py, gpu_speculative_auto.py): greedy runs
from an empty prefix cache with per-step counters, plain baselines, engine set-up and teardown."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.runtime.cuda_graphs import DecodeGraphs
from fxllm.runtime.sampling_params import SamplingParams

PHASES = ("schedule_seconds", "inputs_seconds", "forward_seconds", "sample_seconds", "result_wait_seconds",
          "update_seconds")  # fmt: skip
COUNTERS = ("num_replays", "num_verify_replays", "num_verify_padded", "num_verify_unmatched", "num_too_large")


def base_overrides(smoke: bool, memory_fraction: float = 0.85) -> list[str]:
    """tiny-llama float32 eager on the CPU (`--smoke`), else the 8B preset in bfloat16 on the GPU."""
    if smoke:
        return ["model.model=tiny-llama", "model.device=cpu", "model.dtype=float32", "compile.backend=eager"]
    return ["model.model=llama-3.1-8b", "model.device=cuda", "model.dtype=bfloat16", "model.max_model_len=4096",
            f"cache.gpu_memory_fraction={memory_fraction}"]  # fmt: skip


def build_llm(overrides: list[str], model: torch.nn.Module | None, batches: list[int], smoke: bool) -> LLM:
    """The engine (for `model` when given); on the CPU (`smoke`) its decode / verify buckets run padded, uncaptured."""
    config = load_config(None, overrides)
    llm = LLM(model, config=config) if model is not None else LLM(config=config)
    if smoke:  # no CUDA on the CPU: the same buckets, padded and run without capture
        llm.engine.runner.enable_decode_graphs(batches, llm.engine.max_model_len, capture=False)
    return llm


def release() -> str:
    """After an engine's last reference is gone: collect it and return its GPU memory (for the next engine)."""
    gc.collect()
    torch._dynamo.reset()  # compiled frames keep their graph (and its weights) alive otherwise
    gc.collect()
    if not torch.cuda.is_available():
        return "no CUDA"
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def counters(graphs: DecodeGraphs | None) -> dict[str, int]:
    """The CUDA-graph bucket counters (replays, padded, unmatched)."""
    return {name: getattr(graphs, name) for name in COUNTERS} if graphs is not None else {}


def run_greedy(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[dict[str, Any], list[list[int]]]:
    """Generate greedily from an empty prefix cache; tok/s, steps, ms per step, graph replays, acceptance."""
    engine = llm.engine
    graphs = engine.runner.decode_graphs
    engine.kv_cache.reset_prefix_cache()
    spec = engine.speculator.stats if engine.speculator else None
    steps0, counters0 = engine.stats.num_steps, counters(graphs)
    phases0 = {name: getattr(engine.stats, name) for name in PHASES}
    drafted0, accepted0 = (spec.draft_tokens, spec.accepted_tokens) if spec else (0, 0)
    verify0 = spec.verify_steps if spec else 0
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    steps = max(engine.stats.num_steps - steps0, 1)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    row: dict[str, Any] = {"output_tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "steps": steps,
                           "ms_per_step": 1e3 * seconds / steps}  # fmt: skip
    row["graphs"] = {k: v - counters0[k] for k, v in counters(graphs).items()}
    # Where a step's host time goes (EngineStats phases, ms per step): what async scheduling would hide.
    row["phase_ms_per_step"] = {
        name: 1e3 * (getattr(engine.stats, name) - phases0[name]) / steps for name in PHASES
    }
    row["acceptance"] = None
    if spec is not None:
        drafted = spec.draft_tokens - drafted0
        row["acceptance"] = (spec.accepted_tokens - accepted0) / drafted if drafted else None
        row["draft_tokens"], row["sequence_verify_steps"] = drafted, spec.verify_steps - verify0
    return row, tokens


def plain_runs(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[dict[str, Any], list[list[int]]]:
    """Plain decoding (no speculator) with async scheduling on and off; the tokens of the synchronous run."""
    engine, plain = llm.engine, {}
    tokens: list[list[int]] = []
    for async_on in (True, False):
        engine.speculator, engine.async_scheduling = None, async_on
        plain[f"async_{'on' if async_on else 'off'}"], tokens = run_greedy(llm, prompts, output_len)
    engine.async_scheduling = False
    return plain, tokens


def warm(llm: LLM, prompt: list[int]) -> None:
    """One short plain request (first-use costs out of the timed runs)."""
    llm.engine.speculator = None
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))


def timed(obj: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap obj.name so its wall time (device work included: it ends in a host read) adds up in totals[name]."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(obj, name, wrapper)
