"""Everything GPU-side in one device call: correctness checks, then timings; prints a table.

Usage (on the GPU machine, from the repo root):
    PYTHONPATH=. python3 benchmarks/gpu.py --out $OUT [--skip SECTION] [--only SECTION]
Writes results.json under --out. Each section is independent: a failure is recorded, not fatal.
Sections: small_model_bf16, greedy_tokens, triton_selfcheck, llama8b (benchmarks/gpu_llama8b.py),
profile_decode (benchmarks/gpu_profile.py), and compile_8b (cold/warm compile in fresh processes; only with --only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("fxllm.gpu")


def check_small_model_bf16() -> dict[str, Any]:
    """fxllm.compile logits vs HF eager on a small preset in bf16, eager and inductor backends."""
    from fxllm.compiler import compile_model
    from fxllm.models import load_model

    model = load_model("tiny-llama", device="cuda", dtype=torch.bfloat16).model
    ids = torch.randint(3, model.config.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
    out: dict[str, Any] = {}
    for backend in ("eager", "inductor"):
        try:
            got = compile_model(model, backend=backend)(ids).float()
        except Exception as exc:
            out[backend] = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
            continue
        rel = ((got - ref).norm() / ref.norm()).item()
        out[backend] = {"rel_err": rel, "max_abs": (got - ref).abs().max().item(), "pass": rel < 2e-2}
    return out


@torch.no_grad()
def _first_mismatch(hf: Any, prompt: list[int], ref: list[int], got: list[int]) -> dict[str, Any]:
    """Where greedy outputs first differ and HF's fp32 margin between its top two logits there."""
    i = next(j for j, (a, b) in enumerate(zip(ref, got)) if a != b)
    logits = hf(torch.tensor([prompt + ref[:i]], device="cuda")).logits[0, -1].float()
    top = logits.topk(2)
    return {"position": i, "hf_token": ref[i], "fxllm_token": got[i],
            "hf_top2_margin": (top.values[0] - top.values[1]).item(),
            "hf_margin_to_fxllm_token": (logits[ref[i]] - logits[got[i]]).item()}  # fmt: skip


def check_greedy_tokens() -> dict[str, Any]:
    """Greedy generation through the runtime (CUDA graphs on) equals HF generate on a small preset."""
    from fxllm.config import load_config
    from fxllm.llm import LLM
    from fxllm.models import load_model
    from fxllm.runtime.sampling_params import SamplingParams

    hf = load_model("tiny-llama", device="cuda", dtype=torch.float32).model
    gen = torch.Generator().manual_seed(0)  # the same prompts every run, so a mismatch can be reproduced
    prompt_lens = (5, 17, 40, 3, 9, 64, 33, 8, 21, 50, 2, 12)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in prompt_lens]
    # Different max_tokens: the batch shrinks as requests finish, so several buckets replay.
    lengths = [16, 16, 5, 11, 16, 2, 24, 7, 16, 3, 20, 9]
    refs = [
        hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, min_new_tokens=n, do_sample=False)[
            0, len(p) :
        ].tolist()
        for p, n in zip(prompts, lengths)
    ]
    result: dict[str, Any] = {}
    for backend, graphs_on in (("eager", True), ("inductor", True), ("eager", False)):
        config = load_config(None, ["model.model=tiny-llama", "model.device=cuda", "model.dtype=float32",
                                    f"compile.backend={backend}", "cache.gpu_memory_fraction=0.05",
                                    f"compile.cuda_graphs={str(graphs_on).lower()}"])  # fmt: skip
        llm = LLM(config=config)
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
        outs = llm.generate(prompts, params)
        same = [ref == o.outputs[0].token_ids for ref, o in zip(refs, outs)]
        graphs = llm.engine.runner.decode_graphs
        result[f"{backend}{'' if graphs_on else '-no-graphs'}"] = {
            "equal": same, "pass": all(same) and (graphs is not None and graphs.num_replays > 0) == graphs_on,
            "graph_replays": graphs.num_replays if graphs else 0,
            "graph_seconds": llm.info.decode_graph_seconds, "op_backends": dict(llm.info.op_backends),
            "mismatches": [_first_mismatch(hf, p, ref, o.outputs[0].token_ids)
                           for p, ref, o in zip(prompts, refs, outs) if ref != o.outputs[0].token_ids],
        }  # fmt: skip
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    return result


def time_compile_8b(cache_dir: str) -> dict[str, Any]:
    """fxllm.compile wall time on the llama-3.1-8b preset, cold then with Inductor's cache warm."""
    code = (
        "import time,torch;from fxllm.models import load_model;from fxllm.compiler import compile_model;"
        "m=load_model('llama-3.1-8b',device='cuda',dtype=torch.bfloat16).model;t=time.perf_counter();"
        "cm=compile_model(m,backend='eager');print('EAGER_SECONDS',time.perf_counter()-t,flush=True);"
        "t=time.perf_counter();cm=compile_model(m,backend='inductor');ids=torch.randint(0,1000,(1,16),device='cuda');"
        "cm(ids);torch.cuda.synchronize();print('COMPILE_SECONDS',time.perf_counter()-t)"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    result: dict[str, Any] = {}
    for label in ("cold", "warm"):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=500
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILE_SECONDS")]
        eager = [ln for ln in proc.stdout.splitlines() if ln.startswith("EAGER_SECONDS")]
        result[label] = float(lines[0].split()[1]) if lines else None
        result[f"{label}_capture_and_passes"] = float(eager[0].split()[1]) if eager else None
        result[f"{label}_process_seconds"] = time.perf_counter() - start
        if not lines:
            err = [ln for ln in proc.stderr.splitlines() if not ln.startswith("frame #")]
            result[f"{label}_error"] = "\n".join(err)[-2500:]
    return result


def triton_selfcheck() -> Any:
    """The Triton kernels' own checks on real shapes, if the backend is present."""
    try:
        from fxllm.backends.triton import selfcheck
    except ImportError as exc:
        return {"skipped": str(exc)}
    return selfcheck.check_all(device="cuda", dtype=torch.bfloat16)


def main() -> int:
    """Run every section; print a table; write results.json (after each section, so a timeout keeps results)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--budget-s", type=float, default=570.0, help="stop starting scenarios after this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    deadline = time.perf_counter() + args.budget_s
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_llama8b import run_llama8b
    from gpu_profile import profile_decode

    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    out_file = Path(args.out) / "results.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_file.write_text(json.dumps(results, indent=2, default=str))

    def llama8b() -> dict[str, Any]:
        partial: dict[str, Any] = {}
        results["llama8b"] = partial

        def keep(values: dict[str, Any]) -> None:
            partial.update(values)
            save()

        return run_llama8b(deadline, keep)

    sections = {
        "small_model_bf16": check_small_model_bf16,
        "greedy_tokens": check_greedy_tokens,
        "triton_selfcheck": triton_selfcheck,
        "llama8b": llama8b,
        "profile_decode": profile_decode,
        # Not run by default (measured before, slow: two fresh 8B processes); ask with --only compile_8b.
        "compile_8b": lambda: time_compile_8b("/tmp/fxllm-inductor-cache"),
    }
    chosen = args.only or [name for name in sections if name != "compile_8b"]
    for name in chosen:
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            results[name] = sections[name]()
        except Exception:
            # Keep the Python frames: C++ frame dumps from torch errors would crowd them out.
            lines = [ln for ln in traceback.format_exc().splitlines() if not ln.startswith("frame #")]
            results[name] = {**(results.get(name) or {}), "error": "\n".join(lines)[-6000:]}
        logger.info("%s done in %.1f s", name, time.perf_counter() - start)
        save()
    print(json.dumps(results, indent=1, default=str)[-8000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
