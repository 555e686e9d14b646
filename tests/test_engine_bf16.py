"""The engine end to end in bfloat16 on the CPU (the dtype the README recommends) against HF in bfloat16.

Exact equality is not guaranteed in bfloat16: fxllm's paged attention accumulates in float32 where HF's
SDPA runs in bfloat16, and the GEMMs differ in blocking and reduction order, so a logit can land one
bfloat16 step (8 significant bits: 0.125 between 16 and 32) either side of HF's and flip a near-tie.

What was measured (SmolLM2-135M, eager backend, a CPU without AVX512-BF16):
- these 8 prompts x 12 tokens (at a4c3a5b, op lowering): 6 of 8 match HF bfloat16 token for token; "The three primary colors are"
  diverges at step 3 where HF's top-2 logits tie exactly (21.0 and 21.0, margin 0), and "In 1492,"
  at step 11 where they are one bfloat16 step apart (16.125 vs 16.0); fxllm took HF's runner-up both times;
- tests/test_engine.py's 16 raw prompts x 16 tokens (at 3870d58, before the lowering): 14 of 16 match, with
  the same two divergences.
So 8 tokens (at ce35ee2): 7 of 8 match, the exact tie at step 3 is still met, and HF's reference costs two
thirds of 12 tokens' (HF generates one prompt at a time: 64 bfloat16 forwards instead of 96, ~1 CPU-s each
on this 2-core box without AVX512-BF16, most of this file's time).

So the test requires: every output equals HF's up to its first differing token, and differs there only by
taking HF's runner-up where HF's top-2 margin is at most MAX_MARGIN_ULPS = 2 bfloat16 steps (twice the
largest measured), or, where HF's margin is wider, where the same bfloat16 weights computed in float32 prefer
HF's token by at most that much (HF's bfloat16 SDPA and GEMMs round too: on an AMD EPYC with AVX2, 2026-11-28,
"In 1492," diverged at step 4 with HF's margin 3.0 bfloat16 steps and float32's 0.5; with "Once upon a time"
(1.0 step) and the exact tie, 5 of 8 matched). That bound is the real check: a defect beyond rounding (a lost float32 upcast, a wrong
cache dtype) fails at its first divergence where HF's choice was clear. And at least MIN_EXACT = 5 of 8
prompts match exactly (first 6, one flip more than measured; the AMD EPYC above made three flips, each a
near-tie by the rule: the per-divergence check is what catches defects).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import pytest
import torch
from model_fixtures import cast_parameters

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel
from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_TOKENS = 8  # see the module docstring: the measured exact tie is at step 3
# Short prompts, few tokens: without AVX512-BF16, HF's bfloat16 GEMMs take ~0.8 CPU-s per decoded token
# (measured: 12 CPU-s for 16 tokens of one prompt), so HF's reference generation is most of this file's cost.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
    "Water boils at",
    "A haiku about autumn:",
    "In 1492,",
]
MIN_EXACT = (
    5  # of 8 prompts must match HF token for token (module docstring: measured 7, and 5 on an AMD EPYC)
)
MAX_MARGIN_ULPS = 2.0  # a divergence is allowed only where HF's top-2 logits are this close (measured <= 1)


def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


@dataclass
class Reference:
    """HF bfloat16: the model, the tokenized prompts and HF's greedy continuations."""

    hf: LoadedModel
    prompts: list[list[int]]
    expected: list[list[int]]
    logits: list[list[torch.Tensor]]  # per prompt, per step: the logits HF's greedy step took the argmax of


@pytest.fixture(scope="module")
def ref(smollm2: LoadedModel) -> Reference:
    hf = cast_parameters(smollm2, torch.bfloat16)  # the same parameters as load_model(dtype=bfloat16)
    prompts = [hf.tokenizer(p).input_ids for p in PROMPTS]
    expected, logits = [], []
    with torch.no_grad():
        for ids in prompts:
            out = hf.model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)  # fmt: skip
            expected.append(out.sequences[0, len(ids) :].tolist())
            logits.append([step[0].float() for step in out.logits])
    return Reference(hf, prompts, expected, logits)


def float32_margin(ref: Reference, ids: list[int], hf_token: int, our_token: int) -> float:
    """logit(hf_token) - logit(our_token) after `ids`, the bfloat16 weights computed in float32, in bf16 steps."""
    exact = cast_parameters(ref.hf, torch.float32)  # bf16 values held in float32: only the arithmetic differs
    with torch.no_grad():
        logits = exact.model(torch.tensor([ids])).logits[0, -1].float()
    a, b = logits[hf_token].item(), logits[our_token].item()
    return (a - b) / bf16_ulp(max(a, b))


@pytest.mark.slow
def test_bf16_greedy_matches_hf_bf16_up_to_near_ties(ref: Reference) -> None:
    """>= MIN_EXACT prompts match exactly; every other one matches HF up to its first differing token, and
    differs there only by taking HF's runner-up where HF's top-2 margin is <= MAX_MARGIN_ULPS bf16 steps, or
    where the same weights in float32 arithmetic prefer HF's token by no more than that."""
    config = load_config(None, ["compile.backend=eager", "model.dtype=bfloat16"])
    llm = LLM(copy.deepcopy(ref.hf.model), config=config, tokenizer=ref.hf.tokenizer)
    assert llm.info.dtype == torch.bfloat16
    outs = llm.generate(ref.prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    exact = 0
    for i, (out, expected) in enumerate(zip(outs, ref.expected)):
        got = out.outputs[0].token_ids
        if got == expected:
            exact += 1
            continue
        step = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert step is not None, f"prompt {i}: one output is a prefix of the other: {got} vs {expected}"
        (top1, top2), (id1, id2) = (t.tolist() for t in ref.logits[i][step].topk(2))
        margin_ulps = (top1 - top2) / bf16_ulp(top1)
        logger.info("prompt %d diverges at step %d: HF %d, fxllm %d; HF top-2 margin %.4f (%.1f bf16 steps)",
                    i, step, expected[step], got[step], top1 - top2, margin_ulps)  # fmt: skip
        assert got[step] in (id1, id2), f"prompt {i} step {step}: fxllm's {got[step]} is not HF's top-2"
        if margin_ulps > MAX_MARGIN_ULPS:
            # Not a near-tie in HF's bfloat16: the same weights in float32 arithmetic decide whose rounding it
            # was. fxllm must pick float32's choice or a float32 near-tie; a defect beyond rounding (a lost
            # upcast, a wrong cache dtype) picks against a clear float32 winner.
            exact_margin = float32_margin(ref, ref.prompts[i] + got[:step], expected[step], got[step])
            logger.info("prompt %d step %d: float32 puts HF's token %.1f bf16 steps above fxllm's",
                        i, step, exact_margin)  # fmt: skip
            assert exact_margin <= MAX_MARGIN_ULPS, (
                f"prompt {i} diverges at step {step} where HF's top-2 margin is {top1 - top2:.4f} "
                f"({margin_ulps:.1f} bf16 steps > {MAX_MARGIN_ULPS}) and float32 prefers HF's token by "
                f"{exact_margin:.1f} steps: not a near-tie"
            )
    logger.info("bfloat16: %d of %d prompts match HF token for token", exact, len(PROMPTS))
    assert exact >= MIN_EXACT, f"only {exact} of {len(PROMPTS)} prompts match HF bfloat16 token for token"
