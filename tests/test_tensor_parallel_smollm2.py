"""SmolLM2 at TP=3 on the CPU (gloo): 9 heads and 3 KV heads split 3/1 per rank, the checkpoint loaded whole
and split while loading (the path of every non-preset source); greedy tokens equal TP=1, log-probs within 1e-4.

The model is SmolLM2's first LAYERS layers (its real weights, shapes and tokenizer) saved once as a Hugging
Face folder: each of the four builds (TP=1 and three ranks) then loads safetensors instead of de-quantizing the
GGUF, and captures 4 layers instead of 30. Every layer is split the same way, so depth adds no coverage."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_fixtures import save_hf_folder

from fxllm import LLM, SamplingParams
from fxllm.models import LoadedModel

LAYERS = 4
OVERRIDES = ["compile.backend=eager", "cache.num_blocks=32", "scheduler.max_num_seqs=2"]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
LOGPROB_TOL = 1e-4  # float32


def _run(llm: LLM) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    prompts = ["The capital of France is", "def fibonacci(n):"]
    outputs = [o.outputs[0] for o in llm.generate(prompts, PARAMS)]
    logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in o.logprobs or []] for o in outputs]
    return [list(o.token_ids) for o in outputs], logprobs


@pytest.mark.slow  # four builds (TP=1 and three ranks) of a 4-layer SmolLM2, three of them in spawned ranks
def test_smollm2_tp3_equals_tp1(smollm2_short: LoadedModel, tmp_path: Path) -> None:
    assert smollm2_short.config.num_hidden_layers == LAYERS  # shared per session (conftest.py)
    folder = save_hf_folder(smollm2_short, tmp_path / "smollm2")
    reference = LLM(folder, overrides=OVERRIDES)
    assert reference.info.pass_report.matches("shard_tp") == 0
    expected = _run(reference)
    reference.shutdown()
    del reference
    llm = LLM(folder, overrides=[*OVERRIDES, "parallel.tensor_parallel_size=3"])
    try:
        assert llm.info.pass_report.matches("shard_tp") == 2 * LAYERS  # o_proj and down_proj of every layer
        assert {layer.num_kv_heads for layer in llm.engine.runner.signature.kv_layers} == {1}
        tokens, logprobs = _run(llm)
    finally:
        llm.shutdown()
    assert tokens == expected[0]
    assert all(len(seq) == PARAMS.max_tokens for seq in expected[1])  # every step's log-probs are compared
    for ref_seq, tp_seq in zip(expected[1], logprobs):
        for ref_step, tp_step in zip(ref_seq, tp_seq):
            for token, value in ref_step.items():
                assert abs(tp_step[token] - value) <= LOGPROB_TOL, (token, value, tp_step[token])
