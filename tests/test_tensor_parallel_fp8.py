"""FP8 weights and activations under tensor parallelism (CPU, gloo, two processes), issues 15 and 17.

quantize_fp8 runs before shard_tp, so each rank quantizes its own shard: per-output-channel weight
scales of its rows, and for the row-parallel GEMMs (o_proj, down_proj) per-token activation scales over
its part of the row; the all-reduce then sums dequantized partial products. That is a different
rounding from one rank's FP8, not a worse one, so TP=2's error against the unquantized float32 model
must stay at TP=1 FP8's level; a missing or misplaced all-reduce, or a shard quantized with another
rank's scales, moves log-probabilities by whole units.
"""

from __future__ import annotations

from tp_outputs import PROMPTS

from fxllm import LLM, SamplingParams


def _prompt_logprobs(*overrides: str) -> list[list[float]]:
    """Log-probability of every prompt token after the first (the model's own forward over the prompt)."""
    llm = LLM("tiny-llama", overrides=["compile.backend=eager", "cache.num_blocks=64", "model.dtype=float32",
                                      "scheduler.max_num_seqs=4", *overrides])  # fmt: skip
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    finally:
        llm.shutdown()
    return [[next(iter(step.values())).logprob for step in o.prompt_logprobs[1:]] for o in outputs]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_tp2_fp8_error_stays_at_one_ranks_fp8_error() -> None:
    reference = _prompt_logprobs()
    one_rank = _max_diff(_prompt_logprobs("quantization.method=fp8"), reference)
    two_ranks = _max_diff(
        _prompt_logprobs("quantization.method=fp8", "parallel.tensor_parallel_size=2"), reference
    )
    # Measured on tiny-llama (random weights, hidden 128): 0.256 at TP=1 and 0.264 at TP=2. FP8 noise of
    # this size is what e4m3's 3 mantissa bits give on a random model; 1.5x + 0.05 allows another rounding.
    assert 0 < one_rank < 0.5, one_rank
    assert two_ranks <= 1.5 * one_rank + 0.05, (one_rank, two_ranks)
