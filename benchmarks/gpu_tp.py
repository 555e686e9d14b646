"""Tensor parallelism on 2 or 4 GPUs: all-reduce timings, TP decode speed, TP=N vs TP=1 outputs, fusion.

Usage (GPU machine, repo root; one call per machine kind, < 8 minutes):
    PYTHONPATH=. python3 benchmarks/gpu_tp.py --out $OUT
Sections (default by GPU count: 2 GPUs -> allreduce greedy decode8b fused; 4 GPUs -> allreduce greedy
llama70b fused), or `--sections a,b`:
  allreduce  bf16 [tokens, 4096] all-reduce over all GPUs, 1..2048 tokens: NCCL vs symm-mem one-shot vs
             two-shot vs fxllm's backend (by size), us per call, eager and inside a CUDA graph; checked sums
  greedy     TP=N vs TP=1 in float32 (tiny-llama at TP=2; the Llama-3.1-8B preset cut to 2 layers at TP=4):
             greedy tokens equal, max |logprob difference| of the top-5 over the common prefix
  decode8b   Llama-3.1-8B preset bf16 batch-1 decode at TP=1 and TP=2 (goal TP=2 >= 1.6x), greedy tokens and
             top-5 logprobs of 4 prompts (to compare engines of one run), `--profile`: GPU time by kernel
  decode8b_nccl  the same at TP=2 with every all-reduce through NCCL (op backend "torch")
  tp8b       Llama-3.1-8B preset, one engine per --decode-tp size: batch-1 decode, 1000 x 128/128 and a
             profiled 256 x 128/32 run (the 70B section's batch limits: 256 sequences, graphs up to 256)
  llama70b   Llama-3.1-70B preset bf16 at TP=4: batch-1 decode (goal >= 60 tok/s) and 1000 x 128/128
  fused      all-reduce + add + RMSNorm fused vs not at TP=N (8B preset cut to 8 layers, bf16): ms per
             decode step, max |logprob difference| at the first step, tokens equal
Each engine runs in a child process of its own (its memory and process group go with it; gpu_tp_engine.py). Results go
to $OUT/gpu_tp.json after every part, and a table is printed at the end. `--smoke` runs the engine
sections' code on the CPU (gloo, tiny presets) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_tp_allreduce import HIDDEN, child_allreduce  # sibling scripts (their folder is sys.path[0])
from gpu_tp_engine import child_engine

logger = logging.getLogger("fxllm.gpu.tp")
_START = time.perf_counter()


# ---------------------------------------------------------------- orchestration
def _run_child(
    args: argparse.Namespace, mode: str, payload: dict[str, Any], name: str, timeout: float
) -> dict[str, Any]:
    if args.budget_s is not None:  # end each part before the caller's own limit, so its log still comes back
        timeout = max(1.0, min(timeout, args.budget_s - (time.perf_counter() - _START) - 3.0))
    # Parts go to a scratch folder: $OUT keeps only gpu_tp.json (the device tool returns few files).
    parts = Path(tempfile.gettempdir()) / "fxllm_gpu_tp_parts" / str(os.getpid())
    parts.mkdir(parents=True, exist_ok=True)
    out_file = parts / f"part_{name}.json"
    out_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--child-out",
        str(out_file),
        "--spec",
        json.dumps(payload),
    ]
    start = time.perf_counter()
    logger.info("part %s: %s", name, payload)
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env={**os.environ})
        log_tail = (proc.stdout + proc.stderr)[-3000:]
        code = proc.returncode
    except subprocess.TimeoutExpired as exc:
        log_tail = f"timed out after {timeout:.0f} s; {str(exc.stderr or '')[-2000:]}"
        code = -1
    seconds = time.perf_counter() - start
    if code == -1 and out_file.exists():  # the scenarios finished before the limit
        part = json.loads(out_file.read_text())
        logger.error("part %s timed out after %.0f s; its finished scenarios are kept", name, timeout)
        return {**part, "error": "timed out", "log_tail": log_tail, "wall_s": seconds}
    if code == 0 and out_file.exists():
        part = json.loads(out_file.read_text())
        part["wall_s"] = seconds
        # The child's warnings and errors (a failed capture, a fallback) and its last lines, even on success.
        lines = (proc.stdout + proc.stderr).splitlines()
        part["log_warnings"] = [ln[:400] for ln in lines if "WARNING" in ln or "ERROR" in ln][-40:]
        part["log_tail"] = [ln[:400] for ln in lines[-30:]]
        return part
    logger.error("part %s failed (exit %s):\n%s", name, code, log_tail)
    return {"error": f"exit {code}", "log_tail": log_tail, "wall_s": seconds}


def _engine_spec(model: str, tp: int, scenarios: list[str], extra: list[str], **more: Any) -> dict[str, Any]:
    return {"model": model, "tp": tp, "scenarios": scenarios, "set": extra, **more}


def _logprob_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Tokens equal, and the max |logprob difference| over shared top tokens of the common prefix."""
    if "greedy_tokens" not in a or "greedy_tokens" not in b:
        return {"error": "missing run"}
    worst, equal = 0.0, 0
    first_step = 0.0
    for ta, tb, la, lb in zip(
        a["greedy_tokens"], b["greedy_tokens"], a["greedy_logprobs"], b["greedy_logprobs"]
    ):
        equal += ta == tb
        for i, (sa, sb) in enumerate(zip(la, lb)):
            diffs = [abs(sa[t] - sb[t]) for t in sa if t in sb]
            if diffs:
                worst = max(worst, max(diffs))
                if i == 0:
                    first_step = max(first_step, max(diffs))
            if i < len(ta) and ta[i] != tb[i]:
                break
    return {"sequences_equal": equal, "sequences": len(a["greedy_tokens"]), "max_logprob_diff": worst,
            "max_logprob_diff_first_step": first_step}  # fmt: skip


def main() -> int:
    """Run the sections for this machine; write gpu_tp.json and print a table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sections", default=None)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run: each part ends in time to report (default: none)")  # fmt: skip
    parser.add_argument("--decode-tp", default="1,2", help="TP sizes of the decode8b and tp8b sections")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every engine of the decode8b, tp8b and llama70b sections")  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, gloo, tiny presets: checks the script only"
    )
    parser.add_argument(
        "--throughput-cases", default=None, help="tp8b: PROMPTSxINPUTxOUTPUT,... (default 1000x128x128)"
    )
    parser.add_argument("--profile-case", default=None, help="tp8b: the profiled run, PROMPTSxINPUTxOUTPUT")
    parser.add_argument("--trace-case", default=None,
                        help="tp8b: a run PROMPTSxINPUTxOUTPUT written as a Chrome trace (trace_<part>.json.gz)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="decode8b, llama70b: also profile 64 batch-1 decode steps (GPU time by kernel on rank 0)")  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.child == "allreduce":
        child_allreduce(args.child_out)
        return 0
    if args.child == "engine":
        child_engine(json.loads(args.spec), args.child_out)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        gpus, device = 2, ["model.device=cpu", "compile.backend=eager", "cache.num_blocks=64"]
        big, big70, dtype = "tiny-llama", "tiny-llama", ["model.dtype=float32"]
    else:
        import torch

        gpus, device = torch.cuda.device_count(), ["model.device=cuda", "model.max_model_len=4096"]
        big, big70, dtype = "llama-3.1-8b", "llama-3.1-70b", ["model.dtype=bfloat16"]
    default = "allreduce,greedy,decode8b,fused" if gpus < 4 else "allreduce,greedy,llama70b,fused"
    sections = (args.sections or default).split(",")
    tp = 2 if gpus < 4 else 4
    lengths = {"decode_lengths": (4, 12)} if args.smoke else {}
    results: dict[str, Any] = {"gpus": gpus, "sections": sections, "smoke": args.smoke}
    out_json = Path(args.out) / "gpu_tp.json"

    def save() -> None:
        out_json.write_text(json.dumps(results, indent=1))

    one_bucket = ["compile.cuda_graph_batch_sizes=[1]", "scheduler.max_num_seqs=8"]
    if "allreduce" in sections and not args.smoke:
        results["allreduce"] = _run_child(args, "allreduce", {}, "allreduce", 150)
        save()
    if "greedy" in sections:
        # float32, so that TP=N differs from TP=1 only in the order of the partial sums.
        small = "tiny-llama" if tp == 2 else big
        layers = [] if small == "tiny-llama" else ["model.num_layers=2"]
        extra = [*device, "model.dtype=float32", *one_bucket, *layers]
        one = _run_child(args, "engine", _engine_spec(small, 1, ["greedy"], extra), "greedy_tp1", 240)
        many = _run_child(args, "engine", _engine_spec(small, tp, ["greedy"], extra), f"greedy_tp{tp}", 240)
        results["greedy"] = {"model": small, "tp": tp, **_logprob_diff(one, many),
                             "errors": [r.get("error") for r in (one, many) if "error" in r]}  # fmt: skip
        save()
    if "decode8b" in sections:
        extra = [*device, *dtype, *one_bucket, *args.set]
        for size in (int(v) for v in args.decode_tp.split(",")):
            results[f"decode8b_tp{size}"] = _run_child(
                args,
                "engine",
                _engine_spec(
                    big,
                    size,
                    ["decode1", "greedy", *(["decode1_profile"] if args.profile else [])],
                    extra,
                    **lengths,
                ),
                f"decode8b_tp{size}",
                240,
            )
            save()
    if "decode8b_nccl" in sections:  # the same TP=2 decode with every all-reduce through NCCL
        extra = [*device, *dtype, *one_bucket, "compile.op_backends={all_reduce: torch}"]
        results["decode8b_tp2_nccl"] = _run_child(
            args, "engine", _engine_spec(big, 2, ["decode1"], extra, **lengths), "decode8b_tp2_nccl", 240
        )
        save()
    if "tp8b" in sections:  # one engine per size: batch-1 decode, 1000 x 128/128, a profiled 256 x 128/32
        extra = [*device, *dtype, "scheduler.max_num_seqs=256",
                 "compile.cuda_graph_batch_sizes=[1,2,4,8,16,32,64,128,256]", *args.set]  # fmt: skip
        sizes = {"num_prompts": 16, "output_len": 8, "profile_prompts": 8} if args.smoke else {}
        if args.throughput_cases:  # e.g. 1000x128x128,256x1024x1024: prompts x input x output
            sizes["throughput_cases"] = [
                [int(v) for v in c.split("x")] for c in args.throughput_cases.split(",")
            ]
        if args.profile_case:  # PROMPTSxINPUTxOUTPUT of the profiled run (default 256x128x32)
            sizes["profile_case"] = [int(v) for v in args.profile_case.split("x")]
        scenarios = ["decode1", "throughput", "profile"]
        if args.trace_case:  # a short run whose host and GPU timelines are read offline
            sizes["trace_case"] = [int(v) for v in args.trace_case.split("x")]
            scenarios.append("trace")
        for size in (int(v) for v in args.decode_tp.split(",")):
            spec = _engine_spec(big, size, scenarios, extra, **sizes, **lengths)
            results[f"tp8b_tp{size}"] = _run_child(args, "engine", spec, f"tp8b_tp{size}", 420)
            save()
    if "llama70b" in sections:
        extra = [*device, *dtype, "scheduler.max_num_seqs=256",
                 "compile.cuda_graph_batch_sizes=[1,2,4,8,16,32,64,128,256]", *args.set]  # fmt: skip
        sizes = (
            {"num_prompts": 8, "output_len": 8} if args.smoke else {"num_prompts": 1000, "output_len": 128}
        )
        scenarios = ["decode1", "throughput", *(["decode1_profile"] if args.profile else [])]
        spec = _engine_spec(big70, tp, scenarios, extra, **sizes, **lengths)
        results["llama70b"] = _run_child(args, "engine", spec, f"llama70b_tp{tp}", 600)
        save()
    if "fused" in sections:
        extra = [*device, *dtype, *one_bucket, "model.num_layers=2" if args.smoke else "model.num_layers=8",
                 *(s for s in args.set if "fuse_allreduce_rms_norm" not in s)]  # fmt: skip
        runs = {}
        for fused in (False, True):
            spec = _engine_spec(big, tp, ["greedy", "decode1"], [*extra, f"parallel.fuse_allreduce_rms_norm={fused}"],
                                greedy_tokens=16, **lengths)  # fmt: skip
            runs[fused] = _run_child(args, "engine", spec, f"fused_{fused}", 200)
        results["fused"] = {"unfused": {k: runs[False].get(k) for k in ("decode1_ms_per_token", "op_backends", "error")},
                            "fused": {k: runs[True].get(k) for k in ("decode1_ms_per_token", "op_backends", "error")},
                            **_logprob_diff(runs[False], runs[True])}  # fmt: skip
        save()
    save()
    _print_table(results)
    return 0


def _print_table(results: dict[str, Any]) -> None:
    ar = results.get("allreduce", {})
    if ar.get("rows"):
        print(
            f"all-reduce over {ar['world']} GPUs, bf16 [tokens, {HIDDEN}], us per call (eager / CUDA graph)"
        )
        print(f"{'tokens':>7} " + " ".join(f"{n:>22}" for n in ("nccl", "one_shot", "two_shot", "fxllm")))
        for row in ar["rows"]:
            cells = []
            for name in ("nccl", "one_shot", "two_shot", "fxllm"):
                eager, graph = row.get(f"{name}_eager_us"), row.get(f"{name}_graph_us")
                ok = "" if row.get(f"{name}_ok") else " BAD"
                cells.append(
                    f"{eager:9.1f} / {graph:7.1f}{ok}"
                    if graph is not None
                    else f"{eager:9.1f} / {'fail':>7}{ok}"
                )
            print(f"{row['tokens']:>7} " + " ".join(f"{c:>22}" for c in cells))
    for row in ar.get("fused") or []:
        print("fused all-reduce + add + RMSNorm kernel vs unfused:", row)
    if "greedy" in results:
        print("greedy TP=N vs TP=1 (float32):", results["greedy"])
    for key in [k for k in results if k.startswith("tp8b_")]:
        r = results[key]
        stats = r.get("engine_stats") or {}
        first = (r.get("throughput_cases") or [{}])[0]
        case = f"{first.get('prompts')} x {first.get('input_len')}/{first.get('output_len')}"
        print(f"{key}: batch-1 {r.get('decode1_tok_s')} tok/s, {case} {r.get('throughput_output_tok_s')} "
              f"out tok/s, build {r.get('build_s')} s, steps {stats.get('num_steps')}, preemptions "
              f"{stats.get('num_preemptions')}, gpu idle {stats.get('gpu_idle_seconds')} s {r.get('error', '')}")  # fmt: skip
        print("    GPU ms by kind in the profiled run:", r.get("profile_gpu_ms_by_kind"))
        print("    GPU idle in the profiled run:", r.get("profile_gpu_gaps"), "GC:", r.get("profile_gc"))
        for row in r.get("throughput_cases") or []:
            print("   ", row)
        print(r.get("profile_device_table", "")[:3000])
        print(r.get("profile_host_table", "")[:2500])
        print("warnings:", r.get("log_warnings"))
    for key in ("decode8b_tp1", "decode8b_tp2", "decode8b_tp2_nccl"):
        if key in results:
            r = results[key]
            print(
                f"{key}: batch-1 decode {r.get('decode1_tok_s', 'n/a')} tok/s, build {r.get('build_s')} s {r.get('error', '')}"
            )
            _print_decode_profile(r.get("decode1_profile"))
    if "decode8b_tp1" in results and "decode8b_tp2" in results:
        a, b = results["decode8b_tp1"].get("decode1_tok_s"), results["decode8b_tp2"].get("decode1_tok_s")
        if a and b:
            print(f"TP=2 / TP=1 batch-1 decode: {b / a:.2f}x (goal >= 1.6x)")
    if "llama70b" in results:
        r = results["llama70b"]
        spec = r.get("spec", {})
        print(f"{spec.get('model')} TP={spec.get('tp')}: batch-1 {r.get('decode1_tok_s')} tok/s (goal >= 60), "
              f"{spec.get('num_prompts')} x 128/{spec.get('output_len')} {r.get('throughput_output_tok_s')} "
              f"output tok/s {r.get('error', '')}")  # fmt: skip
        _print_decode_profile(r.get("decode1_profile"))
    if "fused" in results:
        print("fused vs unfused all-reduce + add + RMSNorm:", results["fused"])


def _print_decode_profile(prof: dict[str, Any] | None) -> None:
    if not prof:
        return
    print(f"  per token: wall {prof['wall_ms_per_token']:.3f} ms, kernels {prof['kernel_ms_per_token']:.3f} ms "
          f"(span {prof['kernel_span_ms_per_token']:.3f} ms, {prof['kernels_per_token']:.0f} kernels)")  # fmt: skip
    for row in prof["top"][:15]:
        print(
            f"  {row['us_per_token']:9.1f} us {row['calls_per_token']:6.1f}x {row['median_us']:7.1f} us  {row['name']}"
        )


if __name__ == "__main__":
    sys.exit(main())
