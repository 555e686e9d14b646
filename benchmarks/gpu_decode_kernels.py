"""Batch-1 decode with this step's attention work fused (issue 14) vs the state before, one process.

Usage (GPU machine, repo root; ~3-4 min on one H100: two cold 8B engine builds; add `--modes
fused,unfused,baseline` for the three-way split, ~5 min):
    PYTHONPATH=. python3 benchmarks/gpu_decode_kernels.py --out $OUT
CPU smoke (tiny-llama, eager, the fusion forced onto the reference path, kernel check in Triton's
interpreter; ~1.5 min on 2 cores):
    PYTHONPATH=. python3 benchmarks/gpu_decode_kernels.py --smoke --out /tmp/decode_kernels

Modes: "fused" = RoPE inside the attention kernels (fuse_rope_attention) and the KV write inside the decode
kernel (2 attention launches per layer and step); "unfused" = the pass off, KV write still in decode (3);
"baseline" = the pass off and the separate KV write kernel (4: RoPE, write, decode, combine); "fused+pdl" =
"fused" with programmatic dependent launch on decode and combine (experimental; docs/kernels.md).
First the fused kernels are checked against the reference and against the baseline kernels at Llama-3.1-8B
head shapes (bf16, decode and chunked prefill). Then per mode the Llama-3.1-8B preset engine (bf16, only
the batch-1 CUDA graph) is built and measured: the bucket-1 graph's replay time (median of 5 x 50
replays, CUDA events), kernels per step and GPU time per kernel kind (torch.profiler over 20 replays),
batch-1 decode tok/s (one 128-token prompt, 256 tokens decoded) and 64 greedy tokens of a fixed prompt,
compared with the first mode's. Writes decode_kernels.json after each step and prints a table.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the kernel check runs in Triton's interpreter: set before triton.jit sees kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import gc
import json
import logging
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from gpu_kernel_times import cuda_kernels, kernel_us_by, profile_cuda
from gpu_profile import _kind

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.serve.bench_offline import fxllm_decode_rate, random_prompts

logger = logging.getLogger("fxllm.gpu.decode_kernels")

GPU_BASE = ["model.model=llama-3.1-8b", "model.device=cuda", "model.dtype=bfloat16", "model.max_model_len=2048",
            "scheduler.max_num_seqs=8", "compile.cuda_graph_batch_sizes=[1]", "cache.gpu_memory_fraction=0.4"]  # fmt: skip
SMOKE_BASE = ["model.model=tiny-llama", "model.device=cpu", "compile.backend=eager", "cache.num_blocks=64"]
# mode -> (overrides, the decode kernel writes this step's k/v); the smoke run forces the fusion onto the CPU
# reference path. "baseline" is the state before issue 14's attention fusions: RoPE kernel + KV write kernel.
# "fused+pdl" adds programmatic dependent launch on the decode and combine kernels (experimental, off by default).
# mode -> config overrides. The attention launch variant is an op backend chosen per node
# (fxllm/backends/triton/paged_attention.py VARIANTS), named here through compile.op_backends.
_SEPARATE_WRITE = "compile.op_backends={paged_attention: triton_separate_write, paged_attention_rope: triton_separate_write}"
_PDL = "compile.op_backends={paged_attention: triton_pdl, paged_attention_rope: triton_pdl}"
MODES: dict[str, list[str]] = {
    "fused": ["compile.passes.fuse_rope_attention.enabled=true"],
    "unfused": ["compile.passes.fuse_rope_attention=false"],
    "baseline": ["compile.passes.fuse_rope_attention=false", _SEPARATE_WRITE],
    "fused+pdl": ["compile.passes.fuse_rope_attention.enabled=true", _PDL],
}


def _bucket_graph(llm: LLM) -> Any:
    graphs = llm.engine.runner.decode_graphs
    bucket = next((b for b in graphs.buckets if b.size == 1), None) if graphs else None
    return bucket.graph if bucket is not None else None


def _replay_ms(graph: Any, iters: int = 50, repeats: int = 5) -> float:
    """Median GPU ms of one replay of the batch-1 decode graph."""
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _kernels(graph: Any, replays: int = 20) -> dict[str, Any]:
    """Kernels per replay and GPU us per replay by kind (gpu_profile.py's kinds), from torch.profiler."""
    prof = profile_cuda(graph.replay, replays)
    names = Counter(event.name[:60] for event in cuda_kernels(prof))
    return {
        "kernels_per_step": sum(names.values()) / replays,
        "us_per_step_by_kind": kernel_us_by(prof, _kind, per=replays),
        "launches_per_step_by_name": {k: v / replays for k, v in names.most_common(15)},
    }


def measure(mode: str, base: list[str], smoke: bool) -> tuple[dict[str, Any], list[int]]:
    """Build the engine for `mode`, measure it, shut it down; (results, greedy tokens)."""
    extra = list(MODES[mode])
    if smoke and mode.startswith("fused"):
        extra.append("compile.passes.fuse_rope_attention.options.force=true")
    # The launch variants are CUDA backends; on the CPU the reference runs (kernel_check covers them).
    if smoke:
        extra = [o for o in extra if o not in (_SEPARATE_WRITE, _PDL)]
    start = time.perf_counter()
    llm = LLM(config=load_config(None, [*base, *extra]))
    info = llm.info
    result: dict[str, Any] = {
        "build_seconds": time.perf_counter() - start,
        "fused_layers": info.pass_report.matches("fuse_rope_attention"),
        "attention_layers": info.pass_report.matches("insert_cached_attention"),
        "op_backends": dict(info.op_backends),
        "attention_backend": info.op_backends.get("paged_attention_rope")
        or info.op_backends.get("paged_attention"),
    }
    vocab = llm.engine.vocab_size
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    tokens = list(llm.generate([random_prompts(1, 128, vocab, 4)[0]], params)[0].outputs[0].token_ids)
    decoded = 33 if smoke else 257
    rate = fxllm_decode_rate(llm, random_prompts(1, 128, vocab, 5)[0], decoded).tokens_per_second
    result.update(tok_s=rate, step_ms=1e3 / rate)
    graph = _bucket_graph(llm)
    if graph is not None:
        result["replay_ms"] = _replay_ms(graph)
        result.update(_kernels(graph))
    llm.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, tokens


def kernel_check(small: bool) -> dict[str, Any]:
    """Fused kernels vs the reference (rel. error, bf16 tolerance 1e-2) and vs the unfused kernels (the RoPE
    kernel, the KV write kernel, then attention; max |diff|) at Llama-3.1-8B heads (32 query, 8 KV, head dim 128); `small`: interpreter-sized, CPU."""
    from fxllm.backends.triton import paged_attention, rotary, selfcheck
    from fxllm.ops import paged_attention_rope_reference

    out: dict[str, Any] = {}
    device = "cpu" if small else "cuda"
    hq, hkv, dim = (8, 2, 32) if small else (32, 8, 128)
    cases = {"decode 8 seqs": ([1] * 8, [1, 17, 300, 1000, 2048, 4000, 33, 129]),
             "prefill chunked": ([512, 1, 300, 37], [512, 700, 1200, 37])}  # fmt: skip
    if small:
        cases = {"decode 3 seqs": ([1] * 3, [1, 17, 40]), "prefill chunked": ([9, 1, 5], [9, 30, 20])}
    for name, (q_lens, ctx_lens) in cases.items():
        c = selfcheck.make_paged_case(
            q_lens, ctx_lens, hq, hkv, dim, dtype=torch.bfloat16, device=device, seed=1
        )
        tokens = c.q.shape[0]
        pos = torch.randint(0, 8192, (tokens,), device=device).float()
        inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
        emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
        cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
        meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc)
        tail = (c.scale, c.sliding_window, c.softcap, c.sinks)
        fused = torch.empty((*c.q.shape[:-1], dim), dtype=torch.bfloat16, device=device)
        k_cache = c.k_cache.clone()
        paged_attention.paged_attention_out(c.q, c.k, c.v, k_cache, c.v_cache.clone(), *meta, *tail, fused,
                                            cos=cos, sin=sin)  # fmt: skip
        ref = paged_attention_rope_reference(c.q.float(), c.k.float(), c.v.float(), c.k_cache_ref.float(),
                                             c.v_cache_ref.float(), *meta, cos.float(), sin.float(), *tail)  # fmt: skip
        q4, k4 = c.q.transpose(0, 1)[None], c.k.transpose(0, 1)[None]
        q_rot, k_rot = torch.empty_like(q4), torch.empty_like(k4)
        rotary.rotary_embedding_out(q4, k4, cos[None, None], sin[None, None], q_rot, k_rot)
        unfused = torch.empty_like(fused)
        paged_attention.paged_attention_out(q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), c.v,
                                            c.k_cache.clone(), c.v_cache.clone(), *meta, *tail, unfused,
                                            write_in_decode=False)  # fmt: skip
        err = selfcheck.rel_err(fused[: c.num_real], ref[: c.num_real])
        out[name] = {"rel_err_vs_reference": err, "ok": err < 1e-2,
                     "max_abs_diff_vs_unfused": float((fused - unfused).abs().max())}  # fmt: skip
        if not small and q_lens == [1] * len(q_lens):  # PDL launches: the same kernels, so the same bits
            try:
                pdl = torch.empty_like(fused)
                for _ in range(20):  # a race would show as a difference in some of the runs
                    paged_attention.paged_attention_out(c.q, c.k, c.v, c.k_cache.clone(), c.v_cache.clone(), *meta,
                                                        *tail, pdl, cos=cos, sin=sin, pdl=True)  # fmt: skip
                    out[name]["pdl_equal"] = out[name].get("pdl_equal", True) and bool(
                        torch.equal(pdl, fused)
                    )
            except Exception as exc:  # experimental: report it, do not stop the benchmark
                out[name]["pdl_error"] = repr(exc)[:300]
    return out


def _table(results: dict[str, Any]) -> str:
    keys = ("fused_layers", "replay_ms", "step_ms", "tok_s", "kernels_per_step", "build_seconds")
    lines = [f"{'mode':<10}" + "".join(f"{k:>18}" for k in keys)]
    for mode in [m for m in MODES if m in results]:
        row = results[mode]
        cells = [row.get(k) for k in keys]
        lines.append(
            f"{mode:<10}" + "".join(f"{c:>18.3f}" if isinstance(c, float) else f"{c!s:>18}" for c in cells)
        )
    return "\n".join(lines)


def main() -> int:
    """Kernel check, then each mode's engine measured; decode_kernels.json and a table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="tiny-llama on the CPU: checks the script runs")
    parser.add_argument(
        "--layers", type=int, default=0, help="cut the 8B preset to this many layers (0: all)"
    )
    parser.add_argument("--modes", default="fused,baseline", help=f"comma-separated, of {','.join(MODES)}; "
                        "each is one cold 8B engine build (~80-100 s on an H100)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for both modes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "decode_kernels.json"
    base = list(SMOKE_BASE if args.smoke else GPU_BASE)
    if args.layers:
        base.append(f"model.num_layers={args.layers}")
    base += args.set
    results: dict[str, Any] = {
        "overrides": base,
        "device": "cpu" if args.smoke else torch.cuda.get_device_name(),
    }
    if torch.cuda.is_available() or args.smoke:
        results["kernel_check"] = kernel_check(small=args.smoke)
        out_file.write_text(json.dumps(results, indent=1))
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; modes: {', '.join(MODES)}")
    tokens: dict[str, list[int]] = {}
    for mode in modes:
        results[mode], tokens[mode] = measure(mode, base, args.smoke)
        out_file.write_text(json.dumps(results, indent=1))
    first = tokens[modes[0]]
    for mode in modes[1:]:
        same = next((i for i, (a, b) in enumerate(zip(first, tokens[mode])) if a != b), len(first))
        results[f"greedy_equal_prefix_{modes[0]}_vs_{mode}"] = f"{same} of {len(first)}"
        if "replay_ms" in results[modes[0]] and "replay_ms" in results[mode]:
            results[f"replay_saving_ms_{modes[0]}_vs_{mode}"] = (
                results[mode]["replay_ms"] - results[modes[0]]["replay_ms"]
            )
    out_file.write_text(json.dumps(results, indent=1))
    print(_table(results))
    for key, value in results.items():
        if key.startswith(("greedy_equal", "replay_saving")):
            print(f"{key}: {value}")
    if "kernel_check" in results:
        print(json.dumps(results["kernel_check"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
