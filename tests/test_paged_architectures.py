"""The paged runtime (`LLM.generate`, greedy) equals Hugging Face `generate` on every tiny architecture.

tests/test_models.py checks the non-paged compile path per architecture; tests/test_engine.py checks the
paged runtime on SmolLM2 (Llama) only. Here each tiny preset whose architecture has something Llama does
not runs through the whole runtime (capture, cache passes, paged KV cache, scheduler, sampler):

- tiny-mistral: a 16-token sliding window on every layer, prefilled in 8-token chunks;
- tiny-gemma2: sliding and full layers alternating, attention and final logit soft-caps, tied embeddings;
- tiny-qwen3: RMS norms on q and k per head;
- tiny-phi3: fused qkv and gate/up projections;
- tiny-qwen2: biases on q, k and v.

The prompts (a 40-token shared prefix, then more) and the 24 generated tokens run well past the 16-token
window, so the window is applied in a whole-prompt prefill (tiny-gemma2), in chunked prefill
(tiny-mistral), in a prefill that starts from cached prefix blocks (both) and in every decode step. The
second wave of requests reuses the first one's prefix blocks. float32, token for token.

Each test can fail: dropping the window or the soft-cap in the CPU paged-attention kernel, or giving every
Gemma-2 layer the first layer's window in the cache pass, makes the windowed presets differ from HF
(checked by editing those lines in a scratch copy of the tree).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel, load_model
from fxllm.runtime.sampling_params import SamplingParams

ARCHS = ["tiny-mistral", "tiny-gemma2", "tiny-qwen3", "tiny-phi3", "tiny-qwen2"]
WINDOW = 16  # both windowed presets' sliding_window
NEW_TOKENS = 24
PREFIX_LEN = 40
BLOCK_SIZE = 16
CHUNK = 8  # tiny-mistral's token budget per step: under the window, so windowed prompts span many chunks
# One engine per preset (building one dominates this file's time), so tiny-mistral's is the chunked one.
OVERRIDES = {"tiny-mistral": [f"scheduler.max_num_batched_tokens={CHUNK}"]}

_gen = torch.Generator().manual_seed(1234)


def _random_ids(n: int) -> list[int]:
    # Ids 3.. skip pad/bos/eos; the tiny presets' vocabulary is 512.
    return torch.randint(3, 512, (n,), generator=_gen).tolist()


PREFIX = _random_ids(PREFIX_LEN)
# The first prompt runs alone; the second wave shares its 40-token prefix (two full 16-token blocks
# to reuse) and adds a short prompt that prefills and decodes in the same batches.
FIRST = PREFIX + _random_ids(5)
SECOND_WAVE = [PREFIX + _random_ids(11), _random_ids(7)]
PROMPTS = [FIRST, *SECOND_WAVE]
CACHED = PREFIX_LEN // BLOCK_SIZE * BLOCK_SIZE
# min_tokens masks EOS as HF's min_new_tokens does, so both run the full length whatever they predict.
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)


@dataclass
class Arch:
    """One tiny preset: its HF model and HF's greedy continuation of every prompt."""

    name: str
    hf: LoadedModel
    expected: list[list[int]]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> Arch:
    name = request.param
    hf = load_model(name)
    expected = []
    with torch.no_grad():
        for ids in PROMPTS:
            out = hf.model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            expected.append(out[0, len(ids) :].tolist())
    return Arch(name, hf, expected)


def test_prompts_pass_the_window() -> None:
    """The windowed presets' window is what the prompts were sized for."""
    mistral = load_model("tiny-mistral", device="meta").config
    gemma = load_model("tiny-gemma2", device="meta").config
    assert mistral.sliding_window == gemma.sliding_window == WINDOW
    assert gemma.layer_types == ["sliding_attention", "full_attention"] * 2
    assert len(FIRST) > 2 * WINDOW and WINDOW < NEW_TOKENS and CHUNK < WINDOW
    # The second wave's shared prompt computes more tokens past its cached blocks than the window holds.
    assert len(SECOND_WAVE[0]) - CACHED > WINDOW


def test_paged_greedy_matches_hf(arch: Arch) -> None:
    config = load_config(
        None, ["compile.backend=eager", f"cache.block_size={BLOCK_SIZE}", *OVERRIDES.get(arch.name, [])]
    )
    llm = LLM(copy.deepcopy(arch.hf.model), config=config)
    stats = llm.engine.stats
    steps_before = stats.num_steps
    first = llm.generate([FIRST], GREEDY)[0]
    first_steps = stats.num_steps - steps_before
    second = llm.generate(SECOND_WAVE, GREEDY)
    for i, (out, ref) in enumerate(zip([first, *second], arch.expected)):
        assert len(ref) == NEW_TOKENS
        assert out.outputs[0].token_ids == ref, f"{arch.name}: prompt {i} differs from HF generate"
    # The second wave really started from the first prompt's cached prefix blocks.
    assert first.metrics is not None and first.metrics.num_cached_tokens == 0
    assert second[0].metrics is not None and second[0].metrics.num_cached_tokens == CACHED
    # The prefill of the first prompt took one step, or one per chunk; then a step per further token.
    prefill_steps = -(-len(FIRST) // CHUNK) if arch.name in OVERRIDES else 1
    assert first_steps == prefill_steps + NEW_TOKENS - 1
