"""Runtime end to end on SmolLM2: greedy outputs equal HF generate token for token.

The runtime's paths (prefix reuse, preemption, chunked prefill, arrivals while decoding, streaming, the
Inductor backend) run on SmolLM2's first 4 of 30 layers (conftest.smollm2_short: its real weights,
vocabulary and tokenizer): every layer is the same kind of node, so a paging, scheduling or cache defect
shows in any layer, and each engine and HF reference costs a third of the full model's (the LM head stays).
test_full_depth_matches_hf keeps the real 30-layer model against HF on four of the prompts."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.scheduler import MaxUtilizationScheduler, register_scheduler

# 32 prompts x 8 greedy tokens against HF: HF's one-prompt-at-a-time reference is most of this file's time.
MAX_TOKENS = 8
SYSTEM = "You are a concise assistant who answers questions about geography, history and science. " * 6

RAW = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
    "Water boils at",
    "Translate to French: Good morning, how are you?",
    "A haiku about autumn:",
    "The quick brown fox" + " jumps over the lazy dog and" * 25,  # a few hundred tokens
    "List the planets of the solar system:",
    "import torch\nimport numpy as np\n",
    "In 1492,",
    "Q: What is 12 times 12?\nA:",
    "The mitochondria is",
    "Dear Sir or Madam,",
    "Photosynthesis converts",
]
CHAT = [
    "What is the capital of Japan?",
    "Name three mammals.",
    "Explain gravity in one sentence.",
    "What is 2+2?",
    "Write a short greeting.",
    "Who wrote Hamlet?",
    "What color is the sky?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is the largest ocean?",
    "Describe a cat in five words.",
    "What is H2O?",
    "Say hello in Spanish.",
    "What is the boiling point of water in Fahrenheit?",
    "Name a prime number bigger than 10.",
    "Tell me a fun fact about the moon.",
]


@pytest.fixture(scope="module")
def hf(smollm2_short):
    """The session's shared 4-layer SmolLM2 (conftest.py; see the module docstring): `_llm` builds on a deepcopy."""
    return smollm2_short


@pytest.fixture(scope="module")
def prompts(hf) -> list[list[int]]:
    tok = hf.tokenizer
    raw = [tok(p).input_ids for p in RAW]
    chat = [
        tok.apply_chat_template([{"role": "system", "content": SYSTEM if i % 2 else "Be brief."},
                                 {"role": "user", "content": q}],
                                add_generation_prompt=True, tokenize=True, return_dict=False)
        for i, q in enumerate(CHAT)
    ]  # fmt: skip
    return raw + [list(c) for c in chat]


def _hf_greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
            outs.append(out[0, len(ids) :].tolist())
    return outs


@pytest.fixture(scope="module")
def expected(hf, prompts) -> list[list[int]]:
    return _hf_greedy(hf.model, prompts)


def _llm(hf, *overrides: str) -> LLM:
    config = load_config(None, ["compile.backend=eager", *overrides])
    return LLM(copy.deepcopy(hf.model), config=config, tokenizer=hf.tokenizer)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def default_llm(hf) -> LLM:
    """One engine with the default config, shared by the tests that need no special pool or budget."""
    return _llm(hf)


CONFIGS = {
    "all-at-once": [],
    "no-prefix-reuse": ["cache.enable_prefix_caching=false"],
    "tiny-pool-preempts": ["cache.num_blocks=40", "cache.block_size=16"],
    "chunked-prefill": ["scheduler.max_num_batched_tokens=48"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf(hf, default_llm, prompts, expected, name: str) -> None:
    llm = default_llm if not CONFIGS[name] else _llm(hf, *CONFIGS[name])
    outs = llm.generate(prompts, GREEDY)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} differs under {name}"
    if name == "tiny-pool-preempts":
        assert llm.engine.stats.num_preemptions > 0, "the tiny pool was meant to force preemption"
    if name == "chunked-prefill":
        assert max(len(p) for p in prompts) > 48  # at least one prompt was split into chunks


# One of each kind of prompt: short raw, the few-hundred-token raw one, chat with the short and the long system.
FULL_DEPTH_PROMPTS = [0, 8, 16, 17]


def test_full_depth_matches_hf(smollm2, prompts) -> None:
    """The real 30-layer SmolLM2 through the default engine equals HF generate on the same model."""
    subset = [prompts[i] for i in FULL_DEPTH_PROMPTS]
    assert len(prompts[8]) > 100 and len(prompts[17]) > len(prompts[16])  # the kinds named above
    outs = _llm(smollm2).generate(subset, GREEDY)
    for i, out, ref in zip(FULL_DEPTH_PROMPTS, outs, _hf_greedy(smollm2.model, subset)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} differs at full depth"


def test_inductor_backend_matches_hf(hf, prompts, expected) -> None:
    """The default backend: Inductor, on the CPU with frozen weights where oneDNN has linears to pre-pack
    (and, where they build, the native C++ kernels and C++ wrapper), against HF generate on the same
    4-layer SmolLM2 (Inductor's compile time grows with the graph). The warm-up settles compilation, so
    Dynamo's guard checks are off and no step of these 32 varied prompts needs a variant the warm-up did
    not compile."""
    llm = _llm(hf, "compile.backend=inductor")
    outs = llm.generate(prompts, GREEDY)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} differs with the inductor backend"
    graph = llm.engine.runner._forward
    assert graph.guards_frozen and graph.num_unfrozen == 0


def test_arrivals_while_decoding(default_llm, prompts, expected) -> None:
    engine = default_llm.engine
    ids = {}
    pending = list(enumerate(prompts))
    finals = {}
    while pending or engine.has_unfinished():
        if pending:  # one new request every step, while the earlier ones decode
            i, p = pending.pop(0)
            ids[engine.add_request(p, GREEDY)] = i
        for out in engine.step():
            if out.finished:
                finals[ids[out.request_id]] = out.outputs[0].token_ids
    assert [finals[i] for i in range(len(prompts))] == expected


def test_shared_system_prompt_reuses_blocks(hf, default_llm) -> None:
    llm = default_llm
    tok = hf.tokenizer
    system = "A system prompt no other test uses: you review Python code for style and bugs. " * 6
    first, second = (
        tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                add_generation_prompt=True, tokenize=True, return_dict=False)
        for q in ("Hi!", "Hello there!")
    )  # fmt: skip
    out1 = llm.generate([list(first)], SamplingParams(max_tokens=2, temperature=0))[0]
    out2 = llm.generate([list(second)], SamplingParams(max_tokens=2, temperature=0))[0]
    assert out1.metrics.num_cached_tokens == 0
    block = llm.engine.kv_cache.block_size
    shared = len(system) // 8  # the system prompt alone is well over this many tokens
    assert out2.metrics.num_cached_tokens >= shared // block * block
    assert llm.engine.stats.prefix_hit_rate > 0


@register_scheduler("shortest_prompt_first_test")
class ShortestPromptFirst(MaxUtilizationScheduler):
    """A user policy: admit short prompts first."""

    def admission_order(self, waiting):
        return sorted(waiting, key=lambda s: s.num_prompt_tokens)


def test_user_scheduler_selected_by_config(hf) -> None:
    llm = _llm(hf, "scheduler.policy=shortest_prompt_first_test", "scheduler.max_num_seqs=1")
    assert type(llm.engine.scheduler).__name__ == "ShortestPromptFirst"
    engine = llm.engine
    long_id = engine.add_request("word " * 60, SamplingParams(max_tokens=1, temperature=0))
    short_id = engine.add_request("hi", SamplingParams(max_tokens=1, temperature=0))
    order = [o.request_id for o in engine.run_until_done()]
    assert order == [short_id, long_id]


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", SamplingParams(max_tokens=4), "prompt is empty"),
        ("hello " * 9000, SamplingParams(max_tokens=4), "context"),
        ("hello", SamplingParams(max_tokens=8192), "maximum context length"),
    ],
)
def test_bad_requests_are_rejected_and_engine_keeps_serving(default_llm, prompt, params, message) -> None:
    llm = default_llm
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params)
    assert not llm.engine.has_unfinished()
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature")]
)
def test_bad_sampling_params(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_sampling_field() -> None:
    with pytest.raises(ValueError, match="unknown sampling field 'temprature'"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_async_streaming_matches_sync(default_llm, prompts, expected) -> None:
    llm = default_llm

    async def run() -> list[list[int]]:
        async def one(p):
            seen = []
            async for out in llm.generate_async(p, GREEDY):
                seen.append(len(out.outputs[0].token_ids))
            assert seen == sorted(seen) and len(seen) > 1  # streamed, growing
            return out.outputs[0].token_ids

        return await asyncio.gather(*(one(p) for p in prompts[:6]))

    try:
        assert asyncio.run(run()) == expected[:6]
    finally:
        llm.shutdown()


def test_seeded_sampling_is_reproducible(default_llm) -> None:
    llm = default_llm
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=1234, n=2)
    first = llm.generate(["Tell me a story"], params)[0]
    second = llm.generate(["Tell me a story", "Other prompt in the batch"], params)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids  # n=2 draws differ (seed + index)
