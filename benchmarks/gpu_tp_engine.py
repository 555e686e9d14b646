"""One engine of benchmarks/gpu_tp.py in its own child process: its scenarios, results as JSON.

Scenarios: decode1 (batch-1 decode tok/s from a 288- minus a 32-token run), decode1_profile (GPU time per
kernel over 64 decode steps on rank 0), throughput (N x 128/128), greedy (tokens + top-5 logprobs of 4
prompts), profile (a profiled 256 x 128/32 run, rank 0's view).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from gpu_clocks import ClockSampler
from gpu_kernel_times import cuda_kernels, kernel_us_by
from roofline import ModelShape, decoder_linear_params, ideal_seconds

# EngineStats fields reported per timed run, as deltas: steps, preemptions, GPU idle between steps, garbage
# collections, and the host's step phases (where a run's host time went, and how long it waited on the GPU).
_RUN_STATS = ("num_steps", "num_preemptions", "gpu_idle_seconds", "gc_full_collections", "gc_pause_seconds",
              "schedule_seconds", "inputs_seconds", "forward_seconds", "sample_seconds", "update_seconds",
              "result_wait_seconds", "overlap_seconds")  # fmt: skip


def _roofline(
    spec: dict[str, Any], llm: Any, num: int, input_len: int, output_len: int
) -> dict[str, float] | None:
    """benchmarks/roofline.py's ideal for a bf16 run on one GPU of a preset model (None otherwise: the model
    has bf16 weights, KV and FLOP peaks only)."""
    import torch

    from fxllm.models.presets import list_presets, preset_config

    config = llm.config
    bf16 = config.model.dtype in ("auto", "bfloat16") and config.quantization.method == "none"
    if spec["tp"] != 1 or not bf16 or config.cache.dtype != "auto" or spec["model"] not in list_presets():
        return None
    if not torch.cuda.is_available():  # the card's limits are looked up by its name
        return None
    hf = preset_config(spec["model"])
    shape = ModelShape.from_hf_config(hf, decoder_linear_params(hf))
    max_seqs = llm.engine.scheduler.config.max_num_seqs
    return ideal_seconds(shape, num, input_len, output_len, max_seqs, torch.cuda.get_device_name())


def child_engine(spec: dict[str, Any], out_file: str) -> None:
    """Build one engine from `spec` and run its scenarios; writes a JSON of the results."""
    import torch

    from fxllm.llm import LLM
    from fxllm.runtime.sampling_params import SamplingParams
    from fxllm.serve.bench_offline import random_prompts

    overrides = [f"model.model={spec['model']}", f"parallel.tensor_parallel_size={spec['tp']}", *spec["set"]]
    start = time.perf_counter()
    llm = LLM(overrides=overrides)
    result: dict[str, Any] = {"spec": spec, "build_s": time.perf_counter() - start,
                              "op_backends": llm.info.op_backends, "compile_cache": llm.info.compile_cache}  # fmt: skip
    vocab = llm.engine.vocab_size
    for scenario in spec["scenarios"]:
        Path(out_file).write_text(json.dumps({**result, "partial": True}))  # what a timed-out part still has
        if scenario == "decode1":
            prompt = random_prompts(1, 128, vocab, 4)
            short, long = spec.get("decode_lengths", (32, 288))
            times = {}
            for n in (short, short, long):  # the first run warms up; tok/s from the difference of the others
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                t0 = time.perf_counter()
                llm.generate(prompt, params)
                times[n] = time.perf_counter() - t0
            result["decode1_tok_s"] = (long - short) / (times[long] - times[short])
            result["decode1_ms_per_token"] = 1e3 * (times[long] - times[short]) / (long - short)
        elif scenario == "decode1_profile":  # where a batch-1 decode step's time goes on rank 0's GPU
            result["decode1_profile"] = _profile_decode1(llm, random_prompts(1, 128, vocab, 4))
        elif scenario == "throughput":  # the first case is the headline; more as [prompts, input, output]
            cases = spec.get("throughput_cases") or [
                [spec.get("num_prompts", 1000), 128, spec.get("output_len", 128)]
            ]
            for i, (num, input_len, output_len) in enumerate(cases):
                prompts = random_prompts(num, input_len, vocab, 10 + i)
                params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
                before = dataclasses.asdict(llm.engine.stats)
                kernels_before, compiles_before = _triton_kernels(), llm.engine.runner.num_compiles
                # The clock the case ran at: a power-capped card slows down under load (gpu_clocks.py).
                with ClockSampler() as clocks:
                    t0 = time.perf_counter()
                    outs = llm.generate(prompts, params)
                    seconds = time.perf_counter() - t0
                after = dataclasses.asdict(llm.engine.stats)
                # One-off costs inside the timed run: Triton kernels compiled for the first time (new
                # constexpr / specialisation variants) and Dynamo recompiles of the forward.
                new_kernels = sorted(_triton_kernels() - kernels_before)
                row = {"prompts": num, "input_len": input_len, "output_len": output_len, "seconds": seconds,
                       "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / seconds,
                       **{f"{k}_delta": after[k] - before[k] for k in _RUN_STATS if isinstance(after.get(k), (int, float))},
                       "triton_kernels_compiled": new_kernels,
                       "forward_recompiles": (llm.engine.runner.num_compiles or 0) - (compiles_before or 0),
                       **clocks.summary()}  # fmt: skip
                # The fraction of the ideal (issue 14's goal: 0.7 at 128/2048 and 2048/128).
                ideal = _roofline(spec, llm, num, input_len, output_len)
                if ideal is not None:
                    row["roofline"] = {**ideal, "fraction": row["output_tok_s"] / ideal["out_tok_s"]}
                result.setdefault("throughput_cases", []).append(row)
                if i == 0:
                    result["throughput_output_tok_s"] = row["output_tok_s"]
                    result["throughput_seconds"] = seconds
                Path(out_file).write_text(json.dumps({**result, "partial": True}))
        elif scenario == "greedy":
            prompts = random_prompts(4, 24, vocab, 7)
            params = SamplingParams(max_tokens=spec.get("greedy_tokens", 24), temperature=0, logprobs=5,
                                    ignore_eos=True)  # fmt: skip
            t0 = time.perf_counter()
            outs = [o.outputs[0] for o in llm.generate(prompts, params)]
            seconds = time.perf_counter() - t0
            result["greedy_tokens"] = [list(o.token_ids) for o in outs]
            result["greedy_logprobs"] = [
                [{str(t): lp.logprob for t, lp in step.items()} for step in (o.logprobs or [])] for o in outs
            ]
            steps = max(llm.engine.stats.num_steps, 1)
            result["greedy_seconds"] = seconds
            result["steps_total"] = steps
        elif scenario == "profile":  # where a throughput run's time goes, rank 0's view
            from torch.profiler import ProfilerActivity, profile

            num, input_len, output_len = spec.get("profile_case") or [
                spec.get("profile_prompts", 256),
                128,
                32,
            ]
            prompts = random_prompts(
                num, input_len, vocab, 101
            )  # no seed of the throughput cases (10 + i): no prefix hits
            params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
            llm.generate(prompts[:8], params)
            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            gc_before = (llm.engine.stats.gc_full_collections, llm.engine.stats.gc_pause_seconds)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                llm.generate(prompts, params)
            result["profile_seconds"] = time.perf_counter() - t0
            result["profile_gc"] = {"full_collections": llm.engine.stats.gc_full_collections - gc_before[0],
                                    "pause_seconds": llm.engine.stats.gc_pause_seconds - gc_before[1]}  # fmt: skip
            result["profile_gpu_ms_by_kind"] = gpu_ms_by_kind(prof)
            result["profile_gpu_gaps"] = gpu_gaps(prof)
            result["profile_prefill_calls_us"] = kernel_calls_us(prof, "_prefill_kernel")
            averages = prof.key_averages()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            result["profile_device_table"] = averages.table(
                sort_by=sort, row_limit=25, max_name_column_width=60
            )
            result["profile_host_table"] = averages.table(
                sort_by="cpu_time_total", row_limit=25, max_name_column_width=60
            )
        elif scenario == "trace":  # the whole timeline of a short run, for reading offline (chrome://tracing)
            result["trace_file"] = _trace(llm, spec["trace_case"], Path(out_file).parent, vocab)
    result["engine_stats"] = dataclasses.asdict(llm.engine.stats)
    graphs = getattr(llm.engine.runner, "decode_graphs", None)
    if graphs is not None:
        result["decode_graphs"] = {"buckets": [b.size for b in graphs.buckets],
                                   "num_too_large": graphs.num_too_large}  # fmt: skip
    if torch.cuda.is_available():
        from fxllm.backends import cuda_collectives

        result["collective_counts"] = dataclasses.asdict(cuda_collectives.COUNTS)
    llm.shutdown()
    del llm
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    Path(out_file).write_text(json.dumps(result))


def _profile_decode1(llm: Any, prompt: Any, tokens: int = 64) -> dict[str, Any]:
    """GPU time per decode step by kernel (torch.profiler, rank 0), against the step's wall time: what the
    kernels take vs the gaps between them (host, launch, a peer arriving late at a collective)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fxllm.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt, params)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        llm.generate(prompt, params)
    wall = time.perf_counter() - t0
    kernels = cuda_kernels(prof)
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name[:90], []).append(event.time_range.elapsed_us())
    busy = sum(sum(v) for v in by_name.values())
    span = (
        (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) if kernels else 0
    )
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "tokens": tokens,
        "wall_ms_per_token": 1e3 * wall / tokens,
        "kernel_ms_per_token": busy / 1e3 / tokens,
        "kernel_span_ms_per_token": span / 1e3 / tokens,
        "kernels_per_token": len(kernels) / tokens,
        "top": [
            {
                "name": n,
                "calls_per_token": len(v) / tokens,
                "us_per_token": sum(v) / tokens,
                "median_us": sorted(v)[len(v) // 2],
            }
            for n, v in top
        ],
    }


# Kernel name -> kind, first match wins: cuBLAS / CUTLASS GEMMs, fxllm's attention kernels, Inductor's fused
# kernels (the FP8 activation quantization lives there unless fused into fxllm's producers), fxllm's others.
_KINDS = [
    # Inductor names its kernels after the ops they fuse ("..._amax_clamp_div_fp8_gemm_1" is an activation
    # quantization feeding an FP8 GEMM): Inductor's kinds match before the GEMM pattern.
    ("inductor_fp8_quant", re.compile(r"^triton_.*amax")),
    ("inductor", re.compile(r"^triton_")),
    ("gemm", re.compile(r"nvjet|cutlass|gemm|xmma|sm90_|cublas", re.I)),
    ("attention_decode", re.compile(r"_decode_kernel")),
    ("attention_prefill", re.compile(r"_prefill_kernel")),
    ("fxllm_other", re.compile(r"^_")),
]


def gpu_ms_by_kind(prof: Any) -> dict[str, float]:
    """GPU kernel time of a profile summed by kind (_KINDS; "other" for the rest), in ms."""

    def kind(name: str) -> str:
        return next((k for k, pattern in _KINDS if pattern.search(name)), "other")

    return kernel_us_by(prof, kind, per=1e3)


def kernel_calls_us(prof: Any, name: str) -> list[int]:
    """Durations (us, in launch order) of the GPU kernels whose name contains `name`: how a kind's time
    spreads over a run's steps (e.g. pure prefill steps first, mixed ones later)."""
    calls = sorted(
        (e.time_range.start, e.time_range.elapsed_us()) for e in cuda_kernels(prof) if name in e.name
    )
    return [round(us) for _, us in calls]


def gpu_gaps(prof: Any, min_gap_us: float = 200.0, top: int = 12) -> dict[str, Any]:
    """Where the GPU sat idle inside a profile: the span of its kernels minus their union, the gaps of at
    least `min_gap_us` (count, sum) and the longest ones with the kernels on either side."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in cuda_kernels(prof))
    if not spans:
        return {}
    gaps: list[tuple[float, str, str]] = []
    busy, end, last = 0.0, spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    span = end - spans[0][0]
    long = [g for g in gaps if g[0] >= min_gap_us]
    return {
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (span - busy) / 1e3,
        f"gaps_over_{int(min_gap_us)}us": len(long),
        f"idle_in_gaps_over_{int(min_gap_us)}us_ms": sum(g[0] for g in long) / 1e3,
        "longest": [
            {"us": round(g[0]), "after": g[1], "before": g[2]} for g in sorted(gaps, reverse=True)[:top]
        ],
    }


def _triton_kernels() -> set[str]:
    """Names of the kernels in this process's Triton cache dir (one `<name>.json` per compiled variant)."""
    import os

    root = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return {
        f"{p.parent.name[:8]}/{p.stem}"
        for p in Path(root).glob("*/*.json")
        if not p.name.startswith("__grp__")
    }


def _trace(llm: Any, case: list[int], folder: Path, vocab: int) -> str:
    """Run PROMPTSxINPUTxOUTPUT under torch.profiler (shapes recorded) and write a gzipped Chrome trace."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fxllm.runtime.sampling_params import SamplingParams
    from fxllm.serve.bench_offline import random_prompts

    num, input_len, output_len = case
    prompts = random_prompts(num, input_len, vocab, 102)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:8], params)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        llm.generate(prompts, params)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    raw = folder / f"trace_{num}x{input_len}x{output_len}_r{rank}.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return f"{raw}.gz"
