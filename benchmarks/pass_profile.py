"""Time (and optionally profile) the pass pipeline on one model: per-pass seconds, the post-pass code's hash.

    python benchmarks/pass_profile.py --out /tmp/passes            # SmolLM2, CPU, as a start runs them
    python benchmarks/pass_profile.py --out /tmp/passes --profile 40   # plus the cProfile's top 40 (cumulative)
    python benchmarks/pass_profile.py --out /tmp/passes --smoke     # tiny-llama, 2 layers: seconds
    python benchmarks/pass_profile.py --out /tmp/passes --model llama-3.1-8b --device cuda --runs 2   # the H100

Writes `passes.json` (per-pass seconds of each run, the load average, the code's sha256) and `code.txt` (the
post-pass graph's Python code: two versions of the passes must print the same text). `--runs 2` runs the
passes again on a fresh capture in the same process (what a second model in one process pays).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import logging
import os
import pstats
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fxllm.compiler.cache_graph import WeightRecorder
from fxllm.compiler.capture import capture
from fxllm.models import load_model
from fxllm.passes import pipeline
from fxllm.passes.pipeline import run_passes
from fxllm.passes.registry import PassContext

logger = logging.getLogger(__name__)


def _one_run(model: torch.nn.Module, recorder: bool, profiler: cProfile.Profile | None) -> dict[str, Any]:
    captured = capture(model)
    ctx = PassContext(model_config=model.config, device=captured.device, dtype=captured.dtype)
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    if recorder:
        with WeightRecorder(model, "model"):
            report = run_passes(captured.gm, ctx, include_runtime=True)
    else:
        report = run_passes(captured.gm, ctx, include_runtime=True)
    if profiler is not None:
        profiler.disable()
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    code = captured.gm.code
    return {
        "total_s": round(total, 3),
        "total_cpu_s": round(cpu, 3),
        "capture_s": round(captured.seconds, 3),
        "per_pass_s": {r.name: round(r.seconds, 4) for r in report.records},
        "matches": {r.name: r.matches for r in report.records},
        "code_sha256": hashlib.sha256(code.encode()).hexdigest(),
        "code": code,
    }


def main() -> None:
    """Run the passes `--runs` times and write the JSON and the code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--smoke", action="store_true", help="tiny-llama with 2 layers")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the H100: --model llama-3.1-8b --device cuda)"
    )
    parser.add_argument(
        "--dtype", default=None, help="the model's dtype (default: the loader's for the device)"
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, help="print the cProfile's top N (first run)")
    parser.add_argument(
        "--no-recorder", action="store_true", help="without the compile cache's WeightRecorder"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="per-pass process CPU seconds, not wall (steadier on a shared box)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu_time:  # the pipeline times each pass with time.perf_counter: give it the process's CPU clock
        pipeline.time = SimpleNamespace(perf_counter=time.process_time)  # type: ignore[attr-defined]
    name = "tiny-llama" if args.smoke else args.model
    model = load_model(name, device=args.device, dtype=args.dtype, num_layers=2 if args.smoke else None).model
    load_before = os.getloadavg()
    runs = []
    for index in range(args.runs):
        profiler = cProfile.Profile() if args.profile and index == 0 else None
        runs.append(_one_run(model, not args.no_recorder, profiler))
        if profiler is not None:
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
            stats.print_stats(args.profile)
            stats.sort_stats("tottime").print_stats(args.profile)
            (args.out / "profile.txt").write_text(text.getvalue())
            stats.dump_stats(str(args.out / "profile.pstats"))
            print(text.getvalue())
    (args.out / "code.txt").write_text(runs[0]["code"])
    for run in runs:
        del run["code"]
    result = {
        "model": name,
        "clock": "cpu" if args.cpu_time else "wall",
        "load_average": [load_before, os.getloadavg()],
        "runs": runs,
    }
    (args.out / "passes.json").write_text(json.dumps(result, indent=1))
    names = list(runs[0]["per_pass_s"])
    print(f"{'pass':<26}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs))))
    for pass_name in names:
        print(f"{pass_name:<26}" + "".join(f"{r['per_pass_s'].get(pass_name, 0.0):>10.3f}" for r in runs))
    print(f"{'total (wall)':<26}" + "".join(f"{r['total_s']:>10.3f}" for r in runs))
    print(f"{'total (process CPU)':<26}" + "".join(f"{r['total_cpu_s']:>10.3f}" for r in runs))
    print(f"per-pass clock: {'process CPU' if args.cpu_time else 'wall'}")
    print(
        f"load average before/after: {load_before} / {os.getloadavg()}; code sha256 {runs[0]['code_sha256']}"
    )


if __name__ == "__main__":
    main()
