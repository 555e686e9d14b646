"""Tensor parallelism compiled by Inductor on the CPU (gloo, one process per rank), cold and warm.

The other TP tests run eager graphs; this one compiles each rank's graph with Inductor through the
standalone path (no Dynamo; `compile.cpu_freezing=off`, since frozen weights leave nothing to cache),
which also puts the collectives through Inductor's C++ wrapper. The second engine starts from the same
compile cache: each rank loads its own compiled artifact (the key holds the rank).
"""

from __future__ import annotations

from pathlib import Path

from fxllm import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 7, 100, 12, 40, 41, 42], [1, 300, 2, 77], [1, *range(60, 100)]]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
# Float32 both; Inductor fuses the element-wise work and sums in other orders than eager does, and TP=2
# adds the all-reduce's order: differences of ~1e-5 are expected, 1e-3 leaves room without hiding a bug
# (a wrong shard or a missing all-reduce moves log-probabilities by far more than 0.1).
LOGPROB_TOL = 1e-3


def _run(model_overrides: list[str]) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    llm = LLM("tiny-llama", overrides=["cache.num_blocks=64", "scheduler.max_num_seqs=4", *model_overrides])
    try:
        outputs = [o.outputs[0] for o in llm.generate(PROMPTS, PARAMS)]
    finally:
        llm.shutdown()
    logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in o.logprobs or []] for o in outputs]
    return [list(o.token_ids) for o in outputs], logprobs


def _assert_close(reference: tuple, other: tuple) -> None:
    assert other[0] == reference[0]
    for ref_seq, seq in zip(reference[1], other[1]):
        assert len(ref_seq) == len(seq) == PARAMS.max_tokens
        for ref_step, step in zip(ref_seq, seq):
            for token, value in ref_step.items():
                assert abs(step[token] - value) <= LOGPROB_TOL, (token, value, step[token])


def test_tp2_inductor_cold_and_warm_equal_tp1_eager(tmp_path: Path) -> None:
    reference = _run(["compile.backend=eager"])
    compiled = [
        "compile.backend=inductor", "compile.cpu_freezing=off", "compile.standalone=true",
        "parallel.tensor_parallel_size=2", f"compile.cache_dir={tmp_path}",
    ]  # fmt: skip
    cold = _run(compiled)
    _assert_close(reference, cold)
    artifacts = sorted(tmp_path.glob("graphs/*/inductor-*.bin"))
    assert len(artifacts) == 2, artifacts  # one compiled graph per rank
    stamps = [a.stat().st_mtime_ns for a in artifacts]
    warm = _run(compiled)
    assert warm == cold  # loaded, not recompiled: the same compiled code gives the same bits
    assert [a.stat().st_mtime_ns for a in artifacts] == stamps
