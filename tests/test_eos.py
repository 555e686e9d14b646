"""Several EOS ids: every id of `generation_config.eos_token_id` ends generation, as in HF generate.

Llama-3.1-Instruct lists [128001, 128008, 128009] and Gemma-2 [1, 107]; a chat turn ends in the last
or second one, so taking only the first id would let generation run on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.runtime.engine import resolve_eos_token_ids
from fxllm.runtime.sampling_params import SamplingParams

PRESET = "tiny-llama"
PRESET_EOS = 2  # the tiny presets' eos_token_id
NEW_TOKENS = 12
PROMPT = torch.randint(3, 512, (10,), generator=torch.Generator().manual_seed(7)).tolist()


@dataclass
class TwoEos:
    """An engine whose generation config lists the preset's EOS and a token greedy decoding reaches."""

    llm: LLM
    hf_model: torch.nn.Module
    free_run: list[int]  # greedy tokens with no EOS stopping
    step: int  # where greedy decoding first produces `second_eos`
    second_eos: int


@pytest.fixture(scope="module")
def two_eos() -> TwoEos:
    hf = load_model(PRESET)
    with torch.no_grad():
        out = hf.model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    free_run = out[0, len(PROMPT) :].tolist()
    # The second EOS id is a token greedy decoding first emits at step >= 2 (not the preset's own EOS).
    step = next(
        k for k in range(2, NEW_TOKENS) if free_run[k] not in free_run[:k] and free_run[k] != PRESET_EOS
    )
    second_eos = free_run[step]
    model = copy.deepcopy(hf.model)
    model.generation_config.eos_token_id = [PRESET_EOS, second_eos]
    llm = LLM(model, config=load_config(None, ["compile.backend=eager"]))
    return TwoEos(llm, model, free_run, step, second_eos)


def test_second_eos_id_ends_generation(two_eos: TwoEos) -> None:
    t = two_eos
    assert t.llm.engine.eos_token_ids == (PRESET_EOS, t.second_eos)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    out = t.llm.generate([PROMPT], params)[0].outputs[0]
    assert out.token_ids == t.free_run[: t.step + 1]
    # vLLM reports a generation config's further EOS ids like stop tokens: the id is the stop_reason.
    assert (out.finish_reason, out.stop_reason) == ("stop", t.second_eos)
    assert params.stop_token_ids == []  # the caller's params are not modified
    with torch.no_grad():
        hf = t.hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.token_ids == hf[0, len(PROMPT) :].tolist()  # HF generate stops there too


def test_ignore_eos_and_min_tokens_cover_every_eos_id(two_eos: TwoEos) -> None:
    t = two_eos
    ignore = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    out = t.llm.generate([PROMPT], ignore)[0].outputs[0]
    assert out.token_ids == t.free_run and out.finish_reason == "length"
    # Below min_tokens the second EOS id is held back like the first: greedy picks another token there.
    held = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=t.step + 2, temperature=0)
    out = t.llm.generate([PROMPT], held)[0].outputs[0]
    assert out.token_ids[: t.step] == t.free_run[: t.step]
    assert out.token_ids[t.step] != t.second_eos and len(out.token_ids) >= t.step + 2


def _ns(eos: object) -> SimpleNamespace:
    return SimpleNamespace(eos_token_id=eos)


def test_resolve_eos_token_ids() -> None:
    llama31 = [128001, 128008, 128009]
    # The generation config's list, the tokenizer's EOS first (it reports stop_reason None, as in vLLM).
    assert resolve_eos_token_ids(_ns(llama31), _ns(128009), _ns(128001)) == [128009, 128001, 128008]
    assert resolve_eos_token_ids(_ns([1, 107]), _ns(1), _ns(1)) == [1, 107]  # Gemma-2
    assert resolve_eos_token_ids(_ns(2), _ns(0), _ns(0)) == [2]  # the generation config wins, as in HF
    assert resolve_eos_token_ids(_ns([5, 5, 6]), None, None) == [5, 6]
    # Without a generation config: the tokenizer's EOS and the model config's (a list, or id 0) both count.
    assert resolve_eos_token_ids(None, _ns(128009), _ns(llama31)) == [128009, 128001, 128008]
    assert resolve_eos_token_ids(_ns(None), _ns(0), _ns([0, 5])) == [0, 5]
    assert resolve_eos_token_ids(None, None, _ns([1, 107])) == [1, 107]
    assert resolve_eos_token_ids(None, _ns(None), _ns(None)) == []
