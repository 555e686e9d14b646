"""EAGLE-3 speculative decoding (issue 16): hidden-state outputs, the head's own KV cache, lossless output.

A random-weight head in the public checkpoint layout (written here: no hub download) drafts for tiny-llama
(float32, eager) and SmolLM2. Its drafts are almost never accepted, so losslessness is checked against
plain decoding under every runtime feature (prefix caching, chunked prefill, preemption, n > 1), and the
accept path runs with drafts that are partly the known continuation: then the head catches up on accepted
runs of every length, and its KV entries must equal the ones a fresh engine computes by prefilling the
same tokens (float32; prefill vs decode GEMM shapes move them by ~1e-6, a wrong token, hidden state or
position by ~1e-2).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from test_speculative_engine import CASES, GREEDY, PROMPTS, run

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import LoadedModel, load_model
from fxllm.passes.expose_hidden_states import default_layer_ids
from fxllm.runtime.engine import Engine
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.speculative.eagle3 import Eagle3Proposer
from fxllm.runtime.speculative.eagle3_head import (
    Eagle3Head,
    read_head_config,
    read_head_weights,
    write_random_head,
)

KV_ATOL = 1e-4  # see the module docstring


@pytest.fixture(scope="module")
def parts(
    tmp_path_factory: pytest.TempPathFactory, smollm2: LoadedModel
) -> tuple[torch.nn.Module, Any, Path]:
    tokenizer = smollm2.tokenizer  # decodes the tiny model's ids (< 512) into real text
    model = load_model("tiny-llama").model
    head = write_random_head(tmp_path_factory.mktemp("eagle3") / "head", model.config, draft_vocab_size=128)
    return model, tokenizer, head


def make_engine(parts: tuple[torch.nn.Module, Any, Path], spec: bool, *overrides: str) -> Engine:
    model, tokenizer, head = parts
    sections = [
        "speculative.method=eagle3",
        f"speculative.model={head}",
        "speculative.min_acceptance_rate=0",
        "speculative.auto_disable=off",
    ]
    config = load_config(None, ["compile.backend=eager", "model.dtype=float32", *(sections if spec else []),
                                *overrides])  # fmt: skip
    return LLM(copy.deepcopy(model), config=config, tokenizer=tokenizer).engine


def proposer(engine: Engine) -> Eagle3Proposer:
    prop = engine.speculator.proposer  # type: ignore[union-attr]
    assert isinstance(prop, Eagle3Proposer)
    return prop


def test_checkpoint_layout_and_layer_ids(parts) -> None:
    """The written head reads back in the public layout; default layers follow (2, N/2, N-3), clamped."""
    model, _, head = parts
    config = read_head_config(head)
    weights = read_head_weights(head)
    h = model.config.hidden_size
    assert tuple(weights["fc.weight"].shape) == (h, 3 * h)
    assert tuple(weights["midlayer.self_attn.q_proj.weight"].shape)[1] == 2 * h
    assert tuple(weights["lm_head.weight"].shape) == (128, h) and config.draft_vocab_size == 128
    assert weights["d2t"].dtype == torch.int64 and int((torch.arange(128) + weights["d2t"]).max()) < 512
    assert default_layer_ids(32) == [2, 16, 29] and default_layer_ids(2) == [1, 1, 0]
    with pytest.raises(ValueError, match=r"config\.json"):
        read_head_config(head.parent)


def test_hidden_states_are_the_layer_inputs(parts) -> None:
    """Output 1 of the graph is HF's hidden_states[i] (the stream entering layer i) for the head's layers."""
    engine = make_engine(parts, True)
    prompt = PROMPTS[1]
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), "r")
    engine.step()
    inputs, hidden = engine.runner.last_hidden  # type: ignore[misc]
    assert hidden.shape == (len(prompt), 3 * 128)
    with torch.no_grad():
        ref = parts[0](torch.tensor([prompt]), output_hidden_states=True).hidden_states
    expected = torch.cat([ref[i][0] for i in default_layer_ids(2)], dim=-1)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    assert inputs.chunks[0][1:] == (0, 0, len(prompt))
    plain = make_engine(parts, False)
    assert not plain.runner.returns_hidden, "hidden states are returned with speculation off"


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_plain_decoding(parts, case: str) -> None:
    requests = [(p, GREEDY) for p in PROMPTS]
    plain = run(make_engine(parts, False, *CASES[case]), requests)
    engine = make_engine(parts, True, *CASES[case])
    assert run(engine, requests) == plain
    assert engine.speculator.stats.draft_tokens > 0  # type: ignore[union-attr]
    if case == "tiny-pool-preempts":
        assert engine.stats.num_preemptions > 0


def test_prefix_cache_second_round_and_n(parts) -> None:
    """A second round reuses cached blocks (the head's entries with them); n = 2 equals plain decoding."""
    sampled = SamplingParams(max_tokens=16, temperature=0, n=2, ignore_eos=True)
    requests = [(p, GREEDY) for p in PROMPTS[:3]] + [(PROMPTS[3], sampled)]
    plain_engine, engine = make_engine(parts, False), make_engine(parts, True)
    for _ in range(2):
        assert run(engine, requests) == run(plain_engine, requests)
    assert engine.kv_cache.stats.num_hit_tokens > 0


def _snapshot_head_kv(engine: Engine) -> dict[int, tuple[list[int], int]]:
    """Wrap the proposer's catch-up: after each, every running sequence's (tokens, computed) and head keys."""
    prop = proposer(engine)
    snaps: dict[int, Any] = {}
    original = prop.before_step

    def before_step(eng: Engine) -> None:
        original(eng)
        bs = prop.block_size
        for seq in eng.scheduler.running:
            n = seq.num_computed_tokens
            slots = [seq.block_table[p // bs] * bs + p % bs for p in range(n)]
            keys = prop.k_cache.view(-1, *prop.k_cache.shape[2:])[
                torch.tensor(slots, dtype=torch.long)
            ].clone()
            snaps[seq.seq_id] = (list(seq.token_ids), n, keys)

    prop.before_step = before_step  # type: ignore[method-assign]
    return snaps


@pytest.mark.parametrize("buckets", [False, True])
def test_accepted_runs_keep_the_head_kv_exact(parts, buckets: bool) -> None:
    """Drafts that are 0..k tokens of the known continuation (cycling): outputs equal plain decoding, drafts
    are accepted, and the head's KV after every catch-up equals a fresh prefill of the same tokens. With
    `buckets`, decode and verify steps run the CUDA-graph buckets' padded path (uncaptured on the CPU), where
    the hidden states come back packed after the logits (unequal draft counts: padded verify rows)."""
    requests = [(p, GREEDY) for p in PROMPTS[:3]]
    plain = run(make_engine(parts, False), requests)
    continuation = {tuple(PROMPTS[i]): ids for (i, _), (ids, _, _) in plain.items()}
    engine = make_engine(parts, True)
    if buckets:
        engine.runner.enable_decode_graphs([1, 2, 4], engine.max_model_len, capture=False)
    prop = proposer(engine)
    head_propose, cycle = prop.propose, itertools.count()

    def propose(seqs: list[Any], limits: list[int]) -> list[list[int]]:
        drafts = head_propose(seqs, limits)
        for i, seq in enumerate(seqs):
            ref = continuation[tuple(seq.token_ids[: seq.num_prompt_tokens])]
            good = next(cycle) % (limits[i] + 1)
            o = seq.num_output_tokens
            drafts[i] = ref[o : o + good] + [t + 1 for t in ref[o + good : o + limits[i]]]  # then wrong ones
        return drafts

    prop.propose = propose  # type: ignore[method-assign]
    snaps = _snapshot_head_kv(engine)
    assert run(engine, requests) == plain
    stats = engine.speculator.stats  # type: ignore[union-attr]
    assert stats.accepted_tokens > 0 and stats.accepted_tokens < stats.draft_tokens
    graphs = engine.runner.decode_graphs
    if graphs is not None:
        assert graphs.num_verify_padded > 0 and graphs.num_verify_replays > 0
    for tokens, computed, keys in snaps.values():
        assert computed > len(PROMPTS[0])  # caught up past the prompt
        fresh = make_engine(parts, True, "cache.enable_prefix_caching=false")
        fresh_snaps = _snapshot_head_kv(fresh)
        fresh.add_request(
            tokens[: computed + 1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        )
        fresh.run_until_done()
        (_, fresh_computed, fresh_keys), = fresh_snaps.values()  # fmt: skip
        assert fresh_computed >= computed
        torch.testing.assert_close(keys, fresh_keys[:computed], atol=KV_ATOL, rtol=0)


def test_smollm2_greedy_equals_plain(smollm2_short: LoadedModel) -> None:
    """SmolLM2's real weights, vocabulary and tokenizer, cut to its first 4 layers (conftest.py; every layer
    is the same kind of node, so the hidden-state taps and the head's catch-up are the 30-layer model's, at a
    seventh of two engines' build): the head reads layers 2, 2, 1 (the defaults, clamped; out of order and one
    twice, where the full model's 2, 15, 27 are sorted), float32, a few chat prompts; drafts from a 4,096-id
    draft vocabulary spread over the 49,152 by d2t."""
    loaded = smollm2_short
    tok = loaded.tokenizer
    texts = ["Copy this exactly: the meeting is on Tuesday at 10am in room 4B.",
             "def area(w, h):\n    return w * h\n\nExplain this function in one sentence.",
             "List three colours of the rainbow."]  # fmt: skip
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts
    ]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = []
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        head = write_random_head(Path(folder) / "head", loaded.model.config, draft_vocab_size=4096)
        for spec in (False, True):
            extra = [
                "speculative.method=eagle3",
                f"speculative.model={head}",
                "speculative.min_acceptance_rate=0",
                "speculative.auto_disable=off",
            ]
            config = load_config(
                None, ["model.dtype=float32", "compile.backend=eager", *(extra if spec else [])]
            )
            llm = LLM(copy.deepcopy(loaded.model), config=config, tokenizer=tok)
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
            if spec:
                assert proposer(llm.engine).head.config.aux_layer_ids is None  # the defaults
                assert default_layer_ids(loaded.model.config.num_hidden_layers) == [2, 2, 1]
                stats = llm.engine.speculator.stats  # type: ignore[union-attr]
                assert stats.accepted_tokens < stats.draft_tokens  # drafts were rejected: that path ran
            llm.shutdown()
    assert outs[0] == outs[1]
    # Equality means something: varied tokens (a stuck model would also equal itself), every prompt its own.
    assert all(len(set(tokens)) > 3 for tokens in outs[0])
    assert len({tuple(tokens) for tokens in outs[0]}) == len(prompts)


def test_stopped_requests_leave_the_head_alone(parts) -> None:
    """A request that stops speculating for low acceptance is no longer caught up by the head (its KV is never
    read again); its output still equals plain decoding."""
    requests = [(PROMPTS[0], GREEDY)]
    plain = run(make_engine(parts, False), requests)
    engine = make_engine(
        parts, True, "speculative.min_acceptance_rate=0.9", "speculative.min_acceptance_window=4"
    )
    before = proposer(engine).num_caught_up  # warm-up rows
    assert run(engine, requests) == plain
    assert engine.speculator.stats.requests_disabled == 1  # type: ignore[union-attr]
    # Caught up: the prompt, then a few rows before the switch (window 4 = one verify step); without the
    # skip it would be the prompt plus all 23 further tokens.
    assert proposer(engine).num_caught_up - before < len(PROMPTS[0]) + 8


def test_head_matches_hugging_face_modules(parts) -> None:
    """The head's forward over a fresh paged cache equals the public EAGLE-3 layer assembled from Hugging Face's
    Llama modules (attention over 2H inputs, o_proj back to H, MLP, norms, RoPE), causal over 7 rows."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaMLP,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )

    model, _, folder = parts
    config, weights = read_head_config(folder), read_head_weights(folder)
    embedding = model.get_input_embeddings().weight.detach()
    head = Eagle3Head(config, weights, embedding)
    h, n = config.hidden_size, 7
    gen = torch.Generator().manual_seed(3)
    tokens, target = torch.randint(0, 512, (n,), generator=gen), torch.randn(n, 3 * h, generator=gen)
    cache = torch.zeros(2, 16, config.num_key_value_heads, config.head_dim)
    v_cache = torch.zeros_like(cache)
    got = head(tokens, target, torch.arange(n), torch.ops.fxllm.paged_attention.default, cache, v_cache,
               16 + torch.arange(n), torch.tensor([[1]], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
               torch.tensor([0, n], dtype=torch.int32))  # fmt: skip
    known = {k: v for k, v in config.raw.items() if k not in ("architectures", "eagle_config")}
    hf = LlamaConfig(**{**known, "hidden_size": 2 * h})  # the attention reads [embedding | hidden]
    hf._attn_implementation = "eager"
    attn = LlamaAttention(hf, layer_idx=0)
    attn.o_proj = torch.nn.Linear(config.num_attention_heads * config.head_dim, h, bias=False)
    mlp = LlamaMLP(LlamaConfig(**known))
    norms = {name: LlamaRMSNorm(h, eps=config.rms_norm_eps) for name in ("input", "hidden", "post")}
    with torch.no_grad():
        for proj in ("q", "k", "v", "o"):
            getattr(attn, f"{proj}_proj").weight.copy_(weights[f"midlayer.self_attn.{proj}_proj.weight"])
        for proj in ("gate", "up", "down"):
            getattr(mlp, f"{proj}_proj").weight.copy_(weights[f"midlayer.mlp.{proj}_proj.weight"])
        for name, key in (
            ("input", "input_layernorm"),
            ("hidden", "hidden_norm"),
            ("post", "post_attention_layernorm"),
        ):
            norms[name].weight.copy_(weights[f"midlayer.{key}.weight"])
        hidden = target @ weights["fc.weight"].T
        x = torch.cat([norms["input"](embedding[tokens]), norms["hidden"](hidden)], dim=-1)[None]
        rope = LlamaRotaryEmbedding(LlamaConfig(**known))(x, torch.arange(n)[None])
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = hidden + attn(x, rope, mask)[0][0]
        expected = out + mlp(norms["post"](out))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
