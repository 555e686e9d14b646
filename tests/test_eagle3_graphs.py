"""EAGLE-3 on the decode / verify CUDA-graph buckets, with a captured graph's output semantics (issue 16).

A captured graph writes its outputs into static memory that every replay overwrites, and the buckets share
one memory pool, so every bucket's output may alias the same bytes. On the CPU the buckets run uncaptured
(each call returns fresh tensors), which would hide a reader that holds the hidden states past the next
replay. Here `_replay` writes every bucket's output into ONE shared buffer (the worst aliasing a pool can
give) and the run must equal the uncaptured one bit for bit: the same tokens (the forced chain), the same
drafts accepted and the same head KV cache. A head that read the previous step's hidden states after the
next replay would see the new step's rows instead and write different K/V.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.runtime.cuda_graphs import DecodeBucket, DecodeGraphs
from fxllm.runtime.engine import Engine
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.speculative.eagle3 import Eagle3Proposer
from fxllm.runtime.speculative.eagle3_head import write_random_head
from fxllm.runtime.speculative.oracle import ChainOracle, force_chain_

PROMPTS = [[7, 100, 3, 42, 9], [300, 2, 5], [11, 12, 13, 14, 15, 16, 17]]
MAX_TOKENS = [11, 14, 17]  # unequal: near their ends the sequences draft fewer tokens (padded verify rows)


class SharedStaticOutput:
    """`DecodeGraphs._replay` as a captured graph behaves: outputs land in one static buffer, overwritten each
    replay, and every bucket's output aliases the same bytes."""

    def __init__(self) -> None:
        self.buffer = torch.full((1 << 20,), float("nan"))
        self.num_calls = 0

    def __call__(self, graphs: DecodeGraphs, bucket: DecodeBucket) -> torch.Tensor:
        out = graphs._forward(*graphs._args(bucket))[0]  # type: ignore[index]
        assert isinstance(out, torch.Tensor) and out.numel() <= self.buffer.numel()
        self.num_calls += 1
        static = self.buffer[: out.numel()].view(out.shape)
        static.copy_(out)
        return static


def _engine(head: Path, vocab_out: list[int]) -> Engine:
    model = load_model("tiny-llama").model
    vocab_out.append(force_chain_(model))
    overrides = ["compile.backend=eager", "model.dtype=float32", "speculative.method=eagle3",
                 f"speculative.model={head}", "speculative.num_speculative_tokens=3",
                 "speculative.disable_batch_size=0", "speculative.min_acceptance_rate=0",
                 "speculative.auto_disable=off"]  # fmt: skip
    engine = LLM(model, config=load_config(None, overrides)).engine
    engine.runner.enable_decode_graphs([1, 2, 4], engine.max_model_len, capture=False)
    return engine


def _run(head: Path, static: SharedStaticOutput | None, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    vocab_out: list[int] = []
    engine = _engine(head, vocab_out)
    vocab = vocab_out[0]
    proposer = engine.speculator.proposer  # type: ignore[union-attr]
    assert isinstance(proposer, Eagle3Proposer)
    head_propose, cycle = proposer.propose, itertools.count()

    def propose(seqs: list[Any], limits: list[int]) -> list[list[int]]:
        """The head drafts (its forwards and KV writes run); then 0..k of them replaced by the chain, so that
        accepted runs of every length are caught up on."""
        drafts = head_propose(seqs, limits)
        chains = ChainOracle(vocab).propose(seqs, limits)
        out = []
        for chain, limit in zip(chains, limits):
            good = next(cycle) % (limit + 1)
            out.append(chain[:good] + [(t + 1) % vocab for t in chain[good:limit]])
        return out if all(len(d) == len(o) for d, o in zip(drafts, out)) else drafts

    proposer.propose = propose  # type: ignore[method-assign]
    with monkeypatch.context() as patch:
        if static is not None:
            patch.setattr(DecodeGraphs, "_replay", lambda graphs, bucket: static(graphs, bucket))
        for i, (prompt, max_tokens) in enumerate(zip(PROMPTS, MAX_TOKENS)):
            engine.add_request(
                prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), f"r{i}"
            )
        outs = {o.request_id: list(o.outputs[0].token_ids) for o in engine.run_until_done()}
    stats = engine.speculator.stats  # type: ignore[union-attr]
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    return {"outs": outs, "vocab": vocab, "drafted": stats.draft_tokens, "accepted": stats.accepted_tokens,
            "caught_up": proposer.num_caught_up, "k": proposer.k_cache.clone(), "v": proposer.v_cache.clone(),
            "verify_replays": graphs.num_verify_replays, "padded": graphs.num_verify_padded}  # fmt: skip


def test_static_aliased_outputs_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncaptured buckets vs buckets whose outputs share one static buffer: identical tokens, acceptance and
    head KV (bit for bit: the same ops on the same shapes on the CPU)."""
    config = load_model("tiny-llama").model.config
    head = write_random_head(tmp_path / "head", config, draft_vocab_size=128)
    fresh = _run(head, None, monkeypatch)
    static = SharedStaticOutput()
    shared = _run(head, static, monkeypatch)
    vocab = fresh["vocab"]
    for i, prompt in enumerate(PROMPTS):  # the forced chain, both ways
        want = [(prompt[-1] + j) % vocab for j in range(1, MAX_TOKENS[i] + 1)]
        assert fresh["outs"][f"r{i}"] == want and shared["outs"][f"r{i}"] == want
    assert static.num_calls > 0 and shared["verify_replays"] > 0 and shared["padded"] > 0
    assert 0 < fresh["accepted"] < fresh["drafted"]
    for key in ("drafted", "accepted", "caught_up", "verify_replays", "padded"):
        assert shared[key] == fresh[key], key
    assert torch.equal(shared["k"], fresh["k"]) and torch.equal(shared["v"], fresh["v"])


def test_head_attention_follows_the_fused_rope_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the target's graph holds paged_attention_rope only (fuse_rope_attention): the head takes the same
    backend's paged_attention, not the reference; the reference only where no backend has it."""
    import types

    import fxllm.backends.registry as registry
    import fxllm.passes.lower_ops as lower_ops
    from fxllm.runtime.speculative.eagle3 import attention_for

    kernel = object()
    impls = {("paged_attention", "triton"): kernel}

    def implementation(op: str, name: str) -> Any:
        return types.SimpleNamespace(target=lambda: impls[(op, name)])

    runner: Any = types.SimpleNamespace(graph_module=None, device=torch.device("cpu"))
    reference = torch.ops.fxllm.paged_attention.default
    monkeypatch.setattr(registry, "implementation", implementation)
    for chosen, want in (
        ({"paged_attention_rope": "triton", "rms_norm": "triton"}, kernel),
        ({"paged_attention": "triton"}, kernel),
        ({"paged_attention_rope": "other"}, reference),  # no paged_attention in that backend
        ({"paged_attention_rope": registry.REFERENCE}, reference),
        ({}, reference),
    ):
        monkeypatch.setattr(lower_ops, "implementations_chosen", lambda gm, chosen=chosen: chosen)
        assert attention_for(runner) is want, chosen
