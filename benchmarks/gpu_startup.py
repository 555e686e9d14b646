"""Engine start-up, cold then warm: the same model started in fresh processes with one cache dir.

Usage (on the GPU machine, from the repo root; issue 13's goal: 8B preset warm <= 20 s incl. CUDA graphs,
cold <= 60 s):
    PYTHONPATH=. python3 benchmarks/gpu_startup.py --out $OUT --warm-runs 1 --budget-s 290
    PYTHONPATH=. python3 benchmarks/gpu_startup.py --out /tmp/s --smoke   # CPU check (tiny-llama, Inductor)
Add `--set compile.standalone=false` for the Dynamo path (the "before" of the standalone warm start).
--budget-s caps all starts together (each start gets what is left of it), so a slow cold start leaves the
warm one whatever time remains instead of a fixed share; a start cut off keeps the tail of its log.
Each start is a fresh Python process (a warm start must not reuse this process's in-memory caches); the
first runs on an empty cache dir (cold), the others on what it left (warm). Every start reports its
breakdown from the engine's BuildInfo (load, capture + passes or the cached graph, compile + warm-up,
CUDA graphs) and the process's wall time up to "engine ready" (imports included). Writes startup.json
and each start's log (hit or miss and why, each graph variant's compile) under --out and prints a table.

What the columns cover: `import` is only `from fxllm.config import load_config; from fxllm.llm import LLM`
in the child, i.e. torch (with the dlopen of its CUDA libraries), torch._dynamo with sympy and triton
(fxllm.ops' op registrations import them) and fxllm's modules; no CUDA context is created there. The
model zoo (transformers, gguf) is imported during `load`, which also creates the CUDA context with the
first tensor on the GPU; torch._inductor's compile or load modules and fxllm's passes (Inductor's pattern
matcher) during `cache` / `compile`. `other` is `ready` minus every column (engine set-up between steps).
`--importtime` runs each child under `python -X importtime` and adds, per start, the slowest top-level
imports before `import` ended and after it (startup.json `imports`, and a table).
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

logger = logging.getLogger("fxllm.gpu_startup")

MARK = "STARTUP_JSON "

# Run in the child: build the engine, report the breakdown as one JSON line.
_CHILD = """
import json, logging, sys, time
t0 = time.perf_counter()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from fxllm.config import load_config
from fxllm.llm import LLM
t_import = time.perf_counter() - t0
print("@IMPORTS_DONE@", file=sys.stderr, flush=True)  # splits -X importtime
config = load_config(None, json.loads(sys.argv[1]))
llm = LLM(config=config)
ready = time.perf_counter() - t0
info = llm.info
out = {"import_s": t_import, "ready_s": ready, "load_s": info.load_seconds, "capture_s": info.capture_seconds,
       "passes_s": info.passes_seconds, "cache": info.compile_cache, "cache_s": info.cache_seconds,
       "warmup_s": info.warmup_seconds, "cuda_graphs_s": info.decode_graph_seconds,
       "graph_sizes": list(info.decode_graph_sizes),
       # How the compiled graph came: "loaded" (the Inductor artifact, no Dynamo), "compiled" (standalone
       # compile, saved), "dynamo" (torch.compile), "-" (eager); and how many Inductor compiles it took.
       "compiled": getattr(llm.engine.runner._forward, "source", "dynamo" if info.warmup_seconds else "-"),
       "num_compiles": llm.engine.runner.num_compiles}
print("%s" + json.dumps(out), flush=True)
llm.shutdown()
"""
IMPORTS_DONE = "STARTUP_IMPORTS_DONE"
IMPORTTIME = "import time:"
_CHILD = _CHILD.replace("%s", MARK).replace("@IMPORTS_DONE@", IMPORTS_DONE)


def _text(stderr: str | bytes | None) -> str:
    return stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""


def _log_tail(text: str, lines: int = 12) -> str:
    """The child's last log lines, without C++ stack frames."""
    kept = [ln for ln in text.splitlines() if not ln.startswith("frame #")]
    return "\n".join(kept[-lines:])[-3000:]


def split_importtime(stderr: str, top: int = 12) -> tuple[str, dict[str, Any]]:
    """The child's log without `-X importtime` lines, and its slowest top-level imports per phase."""
    phases: dict[str, list[tuple[str, float]]] = {"import": [], "build": []}
    phase, kept = "import", []
    for line in stderr.splitlines():
        if line.startswith(IMPORTTIME):
            parts = line[len(IMPORTTIME) :].split("|")
            name = parts[2] if len(parts) == 3 else ""
            # Depth 0 (no indent): a top-level import whose cumulative time includes all it pulled in.
            if name.startswith(" ") and not name.startswith("  ") and parts[1].strip().isdigit():
                phases[phase].append((name.strip(), int(parts[1]) / 1e6))
            continue
        if line.strip() == IMPORTS_DONE:
            phase = "build"
            continue
        kept.append(line)
    summary = {
        name: {"total_s": sum(t for _, t in rows), "top": sorted(rows, key=lambda r: -r[1])[:top]}
        for name, rows in phases.items()
    }
    return "\n".join(kept), summary


def start_once(
    overrides: list[str], cache_dir: Path, timeout_s: float, log: Path, importtime: bool = False
) -> dict[str, Any]:
    """One engine start in a fresh process on `cache_dir`; its breakdown and wall time (its log to `log`)."""
    env = {**os.environ, "FXLLM_CACHE_DIR": str(cache_dir)}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(name, None)  # fxllm points them under the cache dir, so cold really is cold
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-c", _CHILD,
                               json.dumps(overrides)], env=env, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        log.write_text(_text(exc.stderr))
        # Where the time went so far: the log says which step (load, capture, a graph variant) was running.
        return {"process_s": time.perf_counter() - start,
                "error": f"timed out after {timeout_s:.0f} s; log tail:\n{_log_tail(_text(exc.stderr))}"}  # fmt: skip
    wall = time.perf_counter() - start
    stderr, imports = split_importtime(proc.stderr)
    log.write_text(stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        return {"process_s": wall, "error": _log_tail(stderr, 40)}
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    result["process_s"] = wall
    parts = ("import_s", "load_s", "capture_s", "passes_s", "cache_s", "warmup_s", "cuda_graphs_s")
    result["other_s"] = result["ready_s"] - sum(result[k] for k in parts)
    if importtime:
        result["imports"] = imports
    return result


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per start: the breakdown in seconds."""
    head = f"{'start':<8}{'ready':>8}{'import':>8}{'load':>8}{'capture':>9}{'passes':>8}{'cache':>7}"
    head += f"{'compile':>9}{'graphs':>8}{'other':>7}  {'graph':<12}cache"
    lines = [head]
    for label, r in rows:
        if "error" in r:
            lines.append(
                f"{label:<8} error after {r.get('process_s', 0):.0f} s: {r['error'].splitlines()[0] if r['error'] else '?'}"
            )
            continue
        lines.append(
            f"{label:<8}{r['ready_s']:>8.1f}{r['import_s']:>8.1f}{r['load_s']:>8.1f}{r['capture_s']:>9.1f}"
            f"{r['passes_s']:>8.1f}{r['cache_s']:>7.1f}{r['warmup_s']:>9.1f}{r['cuda_graphs_s']:>8.1f}"
            f"{r.get('other_s', 0.0):>7.1f}  "
            f"{r.get('compiled', '?') + '/' + str(r.get('num_compiles')):<12}{r['cache'][:60]}"
        )
    return "\n".join(lines)


def import_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Per start (run with --importtime): the slowest top-level imports before and after `import` ended."""
    lines = []
    for label, r in rows:
        for phase, info in r.get("imports", {}).items():
            top = ", ".join(f"{name} {t:.2f}" for name, t in info["top"])
            lines.append(f"{label:<8}{phase:<7}{info['total_s']:>7.1f} s: {top}")
    return "\n".join(lines)


def main() -> int:
    """Start the engine cold, then warm (`--warm-runs` times) on the same cache dir; table + startup.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for startup.json")
    parser.add_argument("--model", default="llama-3.1-8b", help="preset or model (default: the 8B preset)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--warm-runs", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh directory (cold start)")
    parser.add_argument("--timeout-s", type=float, default=280.0, help="at most this per start")
    parser.add_argument("--budget-s", type=float, default=290.0,
                        help="all starts together (a device command may run 600 s); each start gets what is left")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--importtime", action="store_true",
                        help="run each start under python -X importtime; table of the slowest imports")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the script: tiny-llama, Inductor without freezing, budget 900 s")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.model, args.device, args.budget_s, args.timeout_s = "tiny-llama", "cpu", 900.0, 600.0
        args.set = ["compile.cpu_freezing=off", "cache.num_blocks=64", *args.set]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="fxllm-startup-"))
    overrides = [
        f"model.model={args.model}",
        f"model.device={args.device}",
        f"model.dtype={args.dtype}",
        *args.set,
    ]
    rows: list[tuple[str, dict[str, Any]]] = []
    deadline = time.perf_counter() + args.budget_s
    for i in range(1 + args.warm_runs):
        label = "cold" if i == 0 else f"warm{i}"
        left = min(args.timeout_s, deadline - time.perf_counter())
        if left < 5:
            rows.append((label, {"error": f"not started: the {args.budget_s:.0f} s budget is spent"}))
            continue
        logger.info("start %s (cache dir %s, %.0f s left)", label, cache_dir, left)
        rows.append((label, start_once(overrides, cache_dir, left, out / f"{label}.log", args.importtime)))
        if "error" in rows[-1][1]:
            logger.warning("start %s failed: %s", label, rows[-1][1]["error"])
        (out / "startup.json").write_text(json.dumps({"overrides": overrides, "cache_dir": str(cache_dir),
                                                      "starts": dict(rows)}, indent=2))  # fmt: skip
    print(table(rows))
    if args.importtime:
        print(import_table(rows))
    return 0 if all("error" not in r for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
