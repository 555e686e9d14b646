"""FP8 KV cache on the GPU (issue 15): the Triton kernels over an e4m3 cache vs the reference, then decode
throughput of the Llama-3.1-8B preset at batch 64 with cache.dtype=fp8 vs auto.

Usage (GPU machine, repo root): PYTHONPATH=. python3 benchmarks/gpu_fp8_kv.py --out DIR [--sections kernels,engine]
Writes DIR/gpu_fp8_kv.json (after every section) and prints a table.

kernels: Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, block 16). Per case the
Triton op and the reference run on the same inputs and FP8 caches (per-tensor scales 0.5 / 2.0 so the scale
paths count): max abs and relative error of the outputs, whether both wrote the same e4m3 bytes, the error
of the FP8 result against the same step over a bf16 cache (what FP8 costs), and the decode kernel's time
over the FP8 and the bf16 cache (CUDA events, median of 50).
engine: one engine per cache dtype (built, measured, freed), 64 prompts of 128 random tokens, 256 greedy
tokens each (EOS ignored): output tok/s, the decode part's tok/s (from the first token to the last), KV
capacity in tokens, and the fraction of tokens equal between the two (random weights: near-flat logits, so
FP8 rounding flips some picks; stated, not a goal).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

if "--cpu-check" in sys.argv:  # Triton's interpreter: set before any kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

from fxllm.backends.triton.selfcheck import make_paged_case
from fxllm.ops.kv_quant import quantize_kv
from fxllm.ops.paged_attention import paged_attention_reference

logger = logging.getLogger("fxllm.gpu.fp8_kv")

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
K_SCALE, V_SCALE = 0.5, 2.0
KERNEL_CASES = {  # name: (query tokens per sequence, context lengths)
    "decode b64 x 1024": ([1] * 64, [1024] * 64),
    "decode b8 x 4096": ([1] * 8, [4096] * 8),
    "prefill 4 x 512": ([512] * 4, [512] * 4),
    "chunked prefill 2 x 256 after 1024": ([256] * 2, [1280] * 2),
}


def _cuda_ms(fn: Callable[[], Any], iters: int = 50) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels_section(
    cases: dict[str, tuple[list[int], list[int]]] = KERNEL_CASES, device: str = "cuda"
) -> dict[str, Any]:
    """Triton vs reference over FP8 caches, per case; decode timings FP8 vs bf16 cache (CUDA only; on the CPU
    the interpreter runs the same checks on small cases: `python benchmarks/gpu_fp8_kv.py --cpu-check`)."""
    from fxllm.backends.triton import paged_attention as tpa

    results: dict[str, Any] = {}
    ks = torch.tensor([K_SCALE], device=device)
    vs = torch.tensor([V_SCALE], device=device)
    for name, (q_lens, ctx_lens) in cases.items():
        c = make_paged_case(q_lens, ctx_lens, HEADS, KV_HEADS, HEAD_DIM, block_size=BLOCK,
                            dtype=torch.bfloat16, device=device, seed=1)  # fmt: skip
        meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
        k_ref, v_ref = quantize_kv(c.k_cache_ref, ks), quantize_kv(c.v_cache_ref, vs)
        k_tri, v_tri = k_ref.clone(), v_ref.clone()
        ref = paged_attention_reference(c.q, c.k, c.v, k_ref, v_ref, *meta, -1, 0.0, None, ks, vs)
        out = torch.empty_like(c.q)
        tpa.paged_attention_out(c.q, c.k, c.v, k_tri, v_tri, *meta, -1, 0.0, None, out, k_scale=ks, v_scale=vs)  # fmt: skip
        bf16_k, bf16_v = c.k_cache_ref.clone(), c.v_cache_ref.clone()
        exact = paged_attention_reference(c.q, c.k, c.v, bf16_k, bf16_v, *meta)
        n = c.num_real
        diff = (out[:n].float() - ref[:n].float()).abs()
        row = {
            "max_abs_err_vs_reference": float(diff.max()),
            "rel_err_vs_reference": float(diff.norm() / ref[:n].float().norm()),
            "same_cache_bytes": bool(torch.equal(k_tri.view(torch.uint8), k_ref.view(torch.uint8))
                                     and torch.equal(v_tri.view(torch.uint8), v_ref.view(torch.uint8))),
            "rel_err_fp8_vs_bf16_cache": float((out[:n].float() - exact[:n].float()).norm()
                                               / exact[:n].float().norm()),
        }  # fmt: skip
        if device == "cuda" and all(q == 1 for q in q_lens):  # decode: time the op over each cache dtype
            fp8_ms = _cuda_ms(partial(tpa.paged_attention_out, c.q, c.k, c.v, k_tri, v_tri, *meta, -1, 0.0, None,
                                      out, k_scale=ks, v_scale=vs))  # fmt: skip
            bf16_ms = _cuda_ms(partial(tpa.paged_attention_out, c.q, c.k, c.v, bf16_k, bf16_v, *meta, -1, 0.0, None,
                                       out))  # fmt: skip
            kv_bytes = sum(ctx_lens) * KV_HEADS * HEAD_DIM * 2  # K and V, one byte each for e4m3
            row.update({"decode_us_fp8": 1e3 * fp8_ms, "decode_us_bf16": 1e3 * bf16_ms,
                        "fp8_kv_read_GBps": kv_bytes / (fp8_ms * 1e-3) / 1e9,
                        "bf16_kv_read_GBps": 2 * kv_bytes / (bf16_ms * 1e-3) / 1e9})  # fmt: skip
        results[name] = row
        logger.info("%s: %s", name, row)
    return results


def _engine_run(cache: str, prompts: list[list[int]], output_len: int, extra: list[str]) -> dict[str, Any]:
    from fxllm.config import load_config
    from fxllm.llm import LLM
    from fxllm.runtime.sampling_params import SamplingParams

    config = load_config(None, ["model.model=llama-3.1-8b", "model.device=cuda", "model.dtype=bfloat16",
                                "model.max_model_len=4096", f"cache.dtype={cache}", *extra])  # fmt: skip
    start = time.perf_counter()
    llm = LLM(config=config)
    build_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm
    llm.engine.kv_cache.reset_prefix_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    firsts = [o.metrics.first_token_time for o in outs if o.metrics and o.metrics.first_token_time]
    lasts = [o.metrics.finished_time for o in outs if o.metrics and o.metrics.finished_time]
    decode_s = max(lasts) - max(firsts)  # every sequence is decoding from the last first token on
    tokens = [o.outputs[0].token_ids for o in outs]
    row = {"build_seconds": build_s, "output_tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds,
           "decode_tok_s": len(prompts) * (output_len - 1) / decode_s if decode_s > 0 else None,
           "kv_capacity_tokens": llm.engine.runner.capacity_tokens,
           "kv_dtype": str(llm.engine.runner.kv_caches[0].dtype),
           "op_backends": dict(llm.build_info.op_backends), "tokens": tokens}  # fmt: skip
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return row


def engine_section(batch: int, output_len: int, extra: list[str]) -> dict[str, Any]:
    """Batch decode of the 8B preset, cache.dtype auto vs fp8 (one engine at a time)."""
    from fxllm.serve.bench_offline import random_prompts

    prompts = random_prompts(batch, 128, 128256, 21)
    rows = {dtype: _engine_run(dtype, prompts, output_len, extra) for dtype in ("auto", "fp8")}
    a, b = rows["auto"].pop("tokens"), rows["fp8"].pop("tokens")
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    return {"batch": batch, "input_len": 128, "output_len": output_len, **rows,
            "same_token_fraction": same / sum(map(len, a)),
            "fp8_speedup_decode": (rows["fp8"]["decode_tok_s"] or 0) / (rows["auto"]["decode_tok_s"] or 1)}  # fmt: skip


def _table(results: dict[str, Any]) -> str:
    lines = []
    for name, row in results.get("kernels", {}).items():
        lines.append(f"{name:<38} max|err| {row['max_abs_err_vs_reference']:.2e} rel {row['rel_err_vs_reference']:.2e}"
                     f" same bytes {row['same_cache_bytes']} fp8-vs-bf16 {row['rel_err_fp8_vs_bf16_cache']:.3f}"
                     + (f" decode {row['decode_us_fp8']:.0f} us (bf16 {row['decode_us_bf16']:.0f} us)"
                        if "decode_us_fp8" in row else ""))  # fmt: skip
    engine = results.get("engine")
    if engine:
        for dtype in ("auto", "fp8"):
            r = engine[dtype]
            lines.append(f"engine b{engine['batch']} cache {dtype:<5} {r['output_tok_s']:.0f} out tok/s, decode "
                         f"{r['decode_tok_s'] or 0:.0f} tok/s, KV {r['kv_capacity_tokens']} tokens ({r['kv_dtype']})")  # fmt: skip
        lines.append(f"same tokens fp8 vs auto: {engine['same_token_fraction']:.3f}")
    return "\n".join(lines)


def main() -> int:
    """Run the sections; write gpu_fp8_kv.json and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sections", default="kernels,engine")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], help="engine config overrides")
    parser.add_argument("--cpu-check", action="store_true", help="kernel checks on small cases, interpreter")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.cpu_check:
        small = {"decode": ([1, 1], [40, 17]), "chunked prefill": ([9, 3], [30, 3])}
        print(json.dumps(kernels_section(small, "cpu"), indent=1))
        return 0
    out_file = Path(args.out) / "gpu_fp8_kv.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": __import__("triton").__version__}  # fmt: skip
    sections = args.sections.split(",")
    if "kernels" in sections:
        results["kernels"] = kernels_section()
        out_file.write_text(json.dumps(results, indent=1))
    if "engine" in sections:
        results["engine"] = engine_section(args.batch, args.output_len, args.set)
        out_file.write_text(json.dumps(results, indent=1))
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
