"""The forced-chain model and its oracle (issue 16's GPU measurement of the speculative machinery).

force_chain_ keeps random weights everywhere the cost is but forces the greedy next token to t + 1 with a wide
margin, so an oracle that drafts the chain from each sequence's own last token is accepted in full even where
verify GEMMs round differently from decode GEMMs (the bf16 near-ties that broke the old oracle on the H100).
"""

from __future__ import annotations

import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.sequence import Sequence
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.runtime.speculative.oracle import ChainOracle, force_chain_, forced_next


def _forced(dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    model = load_model("tiny-llama", dtype=dtype).model
    return model, force_chain_(model)


def test_forced_model_predicts_the_chain_with_a_margin() -> None:
    """Greedy next token is t + 1 at every position of random contexts, float32 and bfloat16, with a top-two
    margin far above bfloat16 rounding (ulp at the top logit <= 2^-7 of it: a flip needs the margin below that)."""
    for dtype in (torch.float32, torch.bfloat16):
        model, vocab = _forced(dtype)
        ids = torch.randint(0, vocab, (4, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(ids).logits.float()
        top = logits.topk(2, dim=-1)
        want = (ids + 1) % vocab
        assert torch.equal(top.indices[..., 0], want), dtype
        margin = (top.values[..., 0] - top.values[..., 1]).min().item()
        assert margin > 0.25 * top.values[..., 0].max().item(), (dtype, margin)  # >> 2^-7 relative


def test_chain_oracle_follows_the_sequence_not_a_stored_run() -> None:
    """Drafts continue the sequence's own last token (wrapping at the vocabulary's end)."""
    seq = Sequence(seq_id=0, token_ids=[5, 9, 510], num_prompt_tokens=2, max_tokens=8, arrival_time=0.0)
    other = Sequence(seq_id=1, token_ids=[3], num_prompt_tokens=1, max_tokens=8, arrival_time=0.0)
    assert ChainOracle(512).propose([seq, other], [3, 2]) == [[511, 0, 1], [4, 5]]
    assert forced_next(511, 512) == 0


def test_engine_accepts_every_chain_draft() -> None:
    """tiny-llama forced, through the engine with the decode / verify buckets (padded path, uncaptured on the
    CPU): plain greedy output is the chain, and with the chain oracle at k = 3 every draft is accepted and the
    output is the same."""
    model, vocab = _forced(torch.float32)
    overrides = ["compile.backend=eager", "model.dtype=float32", "speculative.method=ngram",
                 "speculative.num_speculative_tokens=3", "speculative.disable_batch_size=0",
                 "speculative.min_acceptance_rate=0", "speculative.auto_disable=off"]  # fmt: skip
    llm = LLM(model, config=load_config(None, overrides))
    engine = llm.engine
    engine.runner.enable_decode_graphs([1, 2], engine.max_model_len, capture=False)
    assert engine.speculator is not None
    config = engine.speculator.config
    prompts = [[7, 100, 3, 42], [9, 511, 2]]
    params = SamplingParams(max_tokens=13, temperature=0, ignore_eos=True)
    engine.speculator = None
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    chains = [[(p[-1] + i) % vocab for i in range(1, 14)] for p in prompts]
    assert plain == chains
    engine.speculator = SpeculativeDecoder(config, ChainOracle(vocab))
    spec = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    stats = engine.speculator.stats
    assert spec == chains
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.num_verify_replays > 0
