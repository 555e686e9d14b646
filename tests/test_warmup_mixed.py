"""The engine's warm-up runs a mixed step (one sequence decoding while another prefills), so that the kernels
of such a step (the attention op splits it between its decode and prefill kernels, issue 14) compile during
start-up and not inside a user's first busy request."""

from __future__ import annotations

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.runtime.model_runner import ModelRunner
from fxllm.runtime.step_inputs import StepInputs


@pytest.mark.parametrize("async_on", [True, False])
def test_warmup_runs_a_step_that_decodes_and_prefills(
    monkeypatch: pytest.MonkeyPatch, async_on: bool
) -> None:
    query_lens: list[list[int]] = []
    execute = ModelRunner.execute

    def recording_execute(self: ModelRunner, inputs: StepInputs) -> torch.Tensor:
        query_lens.append(torch.diff(inputs.query_start_loc).tolist())
        return execute(self, inputs)

    monkeypatch.setattr(ModelRunner, "execute", recording_execute)
    config = load_config(
        None, ["compile.backend=eager", f"scheduler.async_scheduling={str(async_on).lower()}"]
    )
    llm = LLM(load_model("tiny-llama").model, config=config)
    mixed = [lens for lens in query_lens if 1 in lens and any(n > 1 for n in lens)]
    assert mixed, f"no warm-up step both decoded and prefilled; query lengths per step: {query_lens}"
    # The warm-up's requests are gone: nothing runs, every block is free.
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
