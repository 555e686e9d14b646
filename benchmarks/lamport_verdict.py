"""Which all-reduce backends a TP engine run should name, from gpu_tp.py's `allreduce` section.

`python benchmarks/lamport_verdict.py OUT/gpu_tp.json` prints `--set` arguments for gpu_tp.py (nothing when
the Lamport kernels were not exact everywhere or not faster in a CUDA graph at one token): the Lamport
all-reduce where every size summed exactly, before and after its graphs, and beat the size-picked
symm_mem backend; plus the Lamport all-reduce + add + RMSNorm where it equalled the unfused path at every
shape and beat the barrier-based fused kernel.
"""

from __future__ import annotations

import json
import sys


def verdict(allreduce: dict) -> list[str]:
    """The overrides the measurements justify (empty: keep the defaults)."""
    lamport = allreduce.get("lamport") or []
    rows = {r["tokens"]: r for r in allreduce.get("rows", [])}
    if not lamport or not all(r.get("ok") and r.get("ok_after_graphs") for r in lamport):
        return []
    one = next(r for r in lamport if r["tokens"] == 1)
    if not (one.get("graph_us") or 1e9) < (rows.get(1, {}).get("fxllm_graph_us") or 0):
        return []
    backends = ["all_reduce: triton_lamport"]
    extra: list[str] = []
    fused = allreduce.get("fused") or []
    small = [r for r in fused if r.get("hidden") == 4096 and r.get("tokens") == 1]
    exact = bool(fused) and all(r.get("lamport_equal") for r in fused)
    if (
        exact
        and small
        and (small[0].get("lamport_graph_us") or 1e9) < (small[0].get("unfused_graph_us") or 0)
    ):
        backends.append("all_reduce_add_rms_norm: triton_lamport")
        extra = ["--set", "parallel.fuse_allreduce_rms_norm=true"]
    return ["--set", "compile.op_backends={" + ", ".join(backends) + "}", *extra]


def main() -> None:
    """Print the overrides, one shell word per line."""
    with open(sys.argv[1]) as f:
        results = json.load(f)
    for word in verdict(results.get("allreduce") or {}):
        print(word)


if __name__ == "__main__":
    main()
