"""Greedy speculative decoding is lossless on the real model (issue 16, "done means" (b)).

SmolLM2-135M-Instruct (embedded) in float32 on the CPU, n-gram prompt lookup with k = 4, 32
input-grounded prompts (copy / rewrite / extract / edit a given text or code, where lookup drafts well),
all in one batch: the outputs with speculation must equal the outputs without, token for token.

Verification computes the same positions as plain decoding but in GEMMs of other shapes (1 + k rows per
sequence instead of one), so float32 rounding differs in the last bits and an exact near-tie of the two
best logits may flip. A difference therefore passes only if, at its first differing position, the two
tokens are the reference's top two and their logits are within MARGIN_BOUND of each other (the reference:
Hugging Face's forward of the prompt plus the common prefix, float32). Float32 rounding from a change of
GEMM shape moves these logits by ~1e-5 (30 layers, hidden 576); MARGIN_BOUND = 1e-3 leaves two orders of
magnitude for that, while a wrong verification (accepting a draft that is not the argmax) shows margins
of 0.1 and more. The count and the margins are logged and written into the assertion message.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel
from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MARGIN_BOUND = 1e-3  # logits; see the module docstring
MAX_NEW = 16
TEXTS = [
    "The meeting is on Tuesday at 10am in room 4B. Bring the quarterly report and the budget sheet.",
    "Alice Smith, 34, engineer, Boston. Bob Jones, 41, teacher, Denver. Carol White, 29, nurse, Austin.",
    "def area(width, height):\n    return width * height\n\nprint(area(3, 4))",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes it boils at lower temperatures.",
    "Order #4512: 3 x blue mug, 1 x red teapot, 2 x green plate. Ship to 12 Elm Street, Springfield.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue",
    "The quick brown fox jumps over the lazy dog. The dog sleeps while the fox runs into the forest.",
    "Dear team, the release is delayed to Friday because the tests on the payment service still fail.",
]
TASKS = [
    "Copy the following text exactly, without any change:\n\n{}",
    "Rewrite the following text with every sentence on its own line:\n\n{}",
    "Extract the names, numbers and places from the following text, in order:\n\n{}",
    "Edit the following text: replace every full stop by an exclamation mark and keep the rest:\n\n{}",
]


def _prompts(tokenizer: Any) -> list[list[int]]:
    # A one-line system message instead of the template's default one: ~20 fewer tokens to prefill per prompt.
    system = {"role": "system", "content": "You are a careful assistant."}
    chats = [[system, {"role": "user", "content": task.format(text)}] for task in TASKS for text in TEXTS]
    assert len(chats) == 32
    texts = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats
    ]
    return [list(tokenizer(text).input_ids) for text in texts]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@torch.no_grad()
def _near_tie(model: torch.nn.Module, context: list[int], tokens: tuple[int, int]) -> tuple[bool, float]:
    """Whether `tokens` are the reference's top two after `context`, and the margin of its top two logits."""
    logits = model(torch.tensor([context])).logits[0, -1].float()
    top = torch.topk(logits, 2)
    margin = float(top.values[0] - top.values[1])
    return set(top.indices.tolist()) == set(tokens), margin


@pytest.mark.slow  # ~30 s on an idle 2-core box (loading SmolLM2 included); minutes when it is shared
def test_ngram_greedy_equals_plain_on_32_input_grounded_prompts(smollm2: LoadedModel) -> None:
    overrides = ["compile.backend=eager", "model.dtype=float32", "model.max_model_len=512",
                 "speculative.method=ngram", "speculative.num_speculative_tokens=4",
                 "speculative.disable_batch_size=0", "speculative.min_acceptance_rate=0",
                 "speculative.auto_disable=off"]  # fmt: skip
    llm = LLM(copy.deepcopy(smollm2.model), config=load_config(None, overrides), tokenizer=smollm2.tokenizer)
    engine = llm.engine
    speculator = engine.speculator
    assert speculator is not None
    prompts = _prompts(smollm2.tokenizer)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)

    engine.speculator = None  # the same engine, compiled graph and KV pool, speculating or not
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    engine.kv_cache.reset_prefix_cache()
    engine.speculator = speculator
    spec = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    stats = speculator.stats
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0, (
        "nothing drafted or accepted: nothing checked"
    )
    ties, failures = [], []
    for i, (want, got) in enumerate(zip(plain, spec)):
        assert len(got) == len(want) == MAX_NEW
        at = _first_difference(want, got)
        if at is None:
            continue
        is_top_two, margin = _near_tie(smollm2.model, prompts[i] + want[:at], (want[at], got[at]))
        entry = f"prompt {i} token {at}: plain {want[at]} vs speculative {got[at]}, top-2 margin {margin:.2e}"
        (ties if is_top_two and margin <= MARGIN_BOUND else failures).append(entry)
    summary = (
        f"{len(prompts) - len(ties) - len(failures)} of {len(prompts)} identical; {len(ties)} near-ties "
        f"(margin <= {MARGIN_BOUND}): {ties}; acceptance {stats.acceptance_rate:.2f} "
        f"({stats.accepted_tokens} of {stats.draft_tokens} drafts)"
    )
    logger.info("speculative vs plain greedy on SmolLM2: %s", summary)
    assert not failures, f"speculative outputs differ beyond a near-tie: {failures}; {summary}"
