"""Everything GPU-side in one device call: correctness checks, then timings; prints a table.

Usage (on the GPU machine, from the repo root): PYTHONPATH=. python benchmarks/gpu.py [--out DIR]
Writes results.json under --out. Each section is independent: a failure is recorded, not fatal.
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


def check_greedy_tokens() -> dict[str, Any]:
    """Greedy generation through the runtime equals HF generate on a small preset (GPU)."""
    from fxllm.config import load_config
    from fxllm.llm import LLM
    from fxllm.models import load_model
    from fxllm.runtime.sampling_params import SamplingParams

    hf = load_model("tiny-llama", device="cuda", dtype=torch.float32).model
    config = load_config(None, ["model.model=tiny-llama", "model.device=cuda", "model.dtype=float32",
                                "compile.backend=eager", "cache.gpu_memory_fraction=0.05"])  # fmt: skip
    llm = LLM(config=config)
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (5, 17, 40, 3)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    same = []
    for p, o in zip(prompts, outs):
        ref = hf.generate(
            torch.tensor([p], device="cuda"), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
        same.append(ref[0, len(p) :].tolist() == o.outputs[0].token_ids)
    backends = dict(llm.info.op_backends)
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return {"equal": same, "pass": all(same), "op_backends": backends}


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
    """Run every section; print a table; write results.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sections = {
        "small_model_bf16": check_small_model_bf16,
        "greedy_tokens": check_greedy_tokens,
        "triton_selfcheck": triton_selfcheck,
        "compile_8b": lambda: time_compile_8b("/tmp/fxllm-inductor-cache"),
    }
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in sections.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            # Keep the Python frames: C++ frame dumps from torch errors would crowd them out.
            lines = [ln for ln in traceback.format_exc().splitlines() if not ln.startswith("frame #")]
            results[name] = {"error": "\n".join(lines)[-6000:]}
        logger.info("%s done in %.1f s", name, time.perf_counter() - start)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=1, default=str)[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
