"""Section `profile_decode` of benchmarks/gpu.py: where a decode step's GPU time goes, by kernel kind.

Uses the Llama-3.1-8B preset cut to a few layers (every layer has the same kernels, so per-layer
numbers carry over to the 32-layer model; the LM head is counted once), captures decode graphs for
batch 1 and 256, and profiles their replays with torch.profiler.
"""

from __future__ import annotations

import logging
from typing import Any

from gpu_kernel_times import cuda_kernels, kernel_us_by, profile_cuda  # a sibling script

logger = logging.getLogger("fxllm.gpu.profile")

KINDS = {  # first matching substring of the kernel name decides the kind
    "attention": ("_decode_kernel", "_combine_kernel", "_write_kv", "_prefill_kernel"),
    "norm": ("rms", "norm"),
    "rope": ("rope",),
    "activation": ("_gated", "silu", "gelu"),
    "gemm": ("gemm", "cutlass", "nvjet", "sm90", "xmma", "gemv", "splitk"),
}


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS.items() if any(k in low for k in keys)), "other")


def profile_decode(num_layers: int = 4, replays: int = 20) -> dict[str, Any]:
    """GPU microseconds per decode step by kernel kind, at batch 1 and 256."""
    from fxllm.config import load_config
    from fxllm.llm import LLM
    from fxllm.runtime.sampling_params import SamplingParams
    from fxllm.serve.bench_offline import random_prompts

    config = load_config(None, ["model.model=llama-3.1-8b", "model.device=cuda", "model.dtype=bfloat16",
                                f"model.num_layers={num_layers}", "model.max_model_len=4096",
                                "scheduler.max_num_seqs=256",
                                "compile.cuda_graph_batch_sizes=[1,256]",
                                "cache.gpu_memory_fraction=0.5"])  # fmt: skip
    llm = LLM(config=config)
    # Contexts of ~512 tokens for every row of the 256 bucket (its static inputs keep the last step's).
    prompts = random_prompts(256, 512, llm.engine.vocab_size, 0)
    llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    llm.generate(prompts[:1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None
    result: dict[str, Any] = {"num_layers": num_layers, "context_tokens": 512}
    for bucket in graphs.buckets:
        assert bucket.graph is not None
        prof = profile_cuda(bucket.graph.replay, replays)
        by_kind = kernel_us_by(prof, _kind, per=replays)
        top = list(kernel_us_by(prof, lambda name: name[:80], per=replays).items())[:12]
        result[f"batch{bucket.size}"] = {
            "us_per_step_by_kind": by_kind, "kernels_per_step": len(cuda_kernels(prof)) / replays,
            "us_per_step_total": sum(by_kind.values()), "top_kernels_us": dict(top),
        }  # fmt: skip
    llm.shutdown()
    return result
