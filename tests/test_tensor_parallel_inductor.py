"""Tensor parallelism compiled by Inductor on the CPU (gloo, one process per rank), cold and warm.

The other TP tests run eager graphs; this one compiles each rank's graph with Inductor through the
standalone path (no Dynamo; `compile.cpu_freezing=off`, since frozen weights leave nothing to cache),
which also puts the collectives through Inductor's C++ wrapper. The second engine starts from the same
compile cache: each rank loads its own compiled artifact (the key holds the rank).
"""

from __future__ import annotations

from pathlib import Path

from cache_roots import fresh_cache_root
from tp_outputs import Outputs, assert_same, greedy_outputs

from fxllm import LLM

# Float32 both; Inductor fuses the element-wise work and sums in other orders than eager does, and TP=2
# adds the all-reduce's order: differences of ~1e-5 are expected, 1e-3 leaves room without hiding a bug
# (a wrong shard or a missing all-reduce moves log-probabilities by far more than 0.1).
LOGPROB_TOL = 1e-3


def _run(model_overrides: list[str]) -> Outputs:
    llm = LLM("tiny-llama", overrides=["cache.num_blocks=64", "scheduler.max_num_seqs=4", *model_overrides])
    try:
        return greedy_outputs(llm)
    finally:
        llm.shutdown()


def test_tp2_inductor_cold_and_warm_equal_tp1_eager(tmp_path: Path) -> None:
    reference = _run(["compile.backend=eager"])
    compiled = [
        "compile.backend=inductor", "compile.cpu_freezing=off", "compile.standalone=true",
        "parallel.tensor_parallel_size=2", f"compile.cache_dir={fresh_cache_root(tmp_path)}",
    ]  # fmt: skip
    cold = _run(compiled)
    assert_same(reference, cold, LOGPROB_TOL)
    artifacts = sorted(tmp_path.glob("graphs/*/inductor-*.bin"))
    assert len(artifacts) == 2, artifacts  # one compiled graph per rank
    stamps = [a.stat().st_mtime_ns for a in artifacts]
    warm = _run(compiled)
    assert warm == cold  # loaded, not recompiled: the same compiled code gives the same bits
    assert [a.stat().st_mtime_ns for a in artifacts] == stamps
