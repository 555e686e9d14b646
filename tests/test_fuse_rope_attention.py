"""RoPE inside the paged-attention kernels (`fxllm::paged_attention_rope`, fuse_rope_attention; issue 14).

Kernels (Triton's interpreter on a CPU-only machine, as tests/test_triton_kernels.py): the fused op against
its reference (rotary, then paged attention) on float32 copies, tolerances as that file states (float32
1e-5: the same float32 operations; bfloat16 1e-2: one bf16 rounding of the rotated q/k and of the output,
and P rounded to bf16); the keys the kernel wrote into the cache must be the rotated ones. Under the
interpreter (no FMA contraction) the fused kernels must also equal the unfused pair (the RoPE kernel, then
the attention kernels) bit for bit: they do the same float32 products and round once to the same dtype.

Pass, end to end on the CPU (the reference path, `force: true`): tiny presets generate the same greedy
tokens with the pass on and off, and every layer's attention was fused. Without `force` the CPU graph is
left alone (no fused kernel there), with a note.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from triton_interpreted import DEVICE, interpreted

from fxllm import LLM, SamplingParams
from fxllm.ops import paged_attention_rope_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (q_lens, ctx_lens, extra make_paged_case arguments): decode with a padding token and sequence, chunked
# prefill with padding, and sliding window + softcap + sinks on the decode path.
CASES = {
    "decode": ([1, 1, 1], [1, 37, 70], {"pad_tokens": 1, "pad_seqs": 1}),
    "prefill chunked": ([5, 1, 20], [5, 40, 50], {"pad_tokens": 3}),
    "decode window+softcap+sinks": (
        [1, 1, 1],
        [1, 37, 70],
        {"sliding_window": 24, "softcap": 1.5, "sinks": True},
    ),
}
SMALL_LAUNCH = {"block_m": 16, "block_n": 16, "num_splits": 3}


@pytest.fixture(scope="module")
def kernels() -> tuple[Any, Any, Any]:
    """The Triton attention and RoPE kernel modules, interpreted on a CPU-only machine."""
    paged_attention, rotary, selfcheck = interpreted("paged_attention", "rotary", "selfcheck")
    return paged_attention, rotary, selfcheck


def _tables(tokens: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style cos/sin rows [T, D] for random positions, rounded to `dtype` as Hugging Face does."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (tokens,), generator=gen).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(pos, inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


@pytest.mark.parametrize("write_in_decode", [True, False], ids=["kv write in decode", "kv write kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_kernels_match_reference_and_unfused(
    kernels: tuple[Any, Any, Any], dtype: torch.dtype, case: str, write_in_decode: bool
) -> None:
    """Decode writes this step's k/v (rotated) in the decode kernel by default, or in the write kernel; the
    unfused comparison always takes the other route on decode, so the two write paths also meet."""
    paged_attention, rotary, selfcheck = kernels
    q_lens, ctx_lens, extra = CASES[case]
    c = selfcheck.make_paged_case(q_lens, ctx_lens, 8, 2, 32, dtype=dtype, device=DEVICE, seed=7, **extra)
    cos, sin = _tables(c.q.shape[0], 32, dtype, seed=8)
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc)
    tail = (c.scale, c.sliding_window, c.softcap, c.sinks)
    k_cache, v_cache = c.k_cache.clone(), c.v_cache.clone()
    out = torch.full((*c.q.shape[:-1], c.v.shape[-1]), float("nan"), dtype=dtype, device=DEVICE)
    paged_attention.paged_attention_out(
        c.q,
        c.k,
        c.v,
        k_cache,
        v_cache,
        *meta,
        *tail,
        out,
        cos=cos,
        sin=sin,
        write_in_decode=write_in_decode,
        **SMALL_LAUNCH,
    )
    # The reference on float32 copies (caches with every context slot finite).
    kr, vr = c.k_cache_ref.float(), c.v_cache_ref.float()
    ref = paged_attention_rope_reference(
        c.q.float(), c.k.float(), c.v.float(), kr, vr, *meta, cos.float(), sin.float(), *tail
    )
    n = c.num_real
    assert not out.isnan().any()
    assert bool((out[n:] == 0).all()), "padding tokens must get zeros"
    assert selfcheck.rel_err(out[:n], ref[:n]) < TOL[dtype]
    slots = c.context_slots
    written = k_cache.flatten(0, 1)[slots].float()
    assert selfcheck.rel_err(written, kr.flatten(0, 1)[slots]) < TOL[dtype], (
        "the cache must hold rotated keys"
    )
    assert torch.equal(v_cache.flatten(0, 1)[slots].float(), vr.flatten(0, 1)[slots])
    if DEVICE != "cpu":
        return  # compiled kernels may contract a*b + c*d differently in the two kernels
    # Unfused: the RoPE kernel on [1, H, T, D] views, then the attention kernels.
    q4, k4 = c.q.transpose(0, 1)[None], c.k.transpose(0, 1)[None]
    q_rot, k_rot = torch.empty_like(q4), torch.empty_like(k4)
    rotary.rotary_embedding_out(q4, k4, cos[None, None], sin[None, None], q_rot, k_rot)
    k_cache2, v_cache2 = c.k_cache.clone(), c.v_cache.clone()
    out2 = torch.full_like(out, float("nan"))
    paged_attention.paged_attention_out(
        q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), c.v, k_cache2, v_cache2, *meta, *tail, out2,
        write_in_decode=not write_in_decode, **SMALL_LAUNCH,
    )  # fmt: skip
    assert torch.equal(out, out2)
    assert torch.equal(k_cache.flatten(0, 1)[slots], k_cache2.flatten(0, 1)[slots])


@pytest.mark.parametrize("case", ["decode", "prefill chunked"])
def test_fused_kernels_fp8_cache_equal_unfused(kernels: tuple[Any, Any, Any], case: str) -> None:
    """An FP8 cache (per-head scales): the rotated key is rounded to q's dtype, then quantized, as unfused."""
    from fxllm.ops.kv_quant import quantize_kv

    paged_attention, rotary, selfcheck = kernels
    q_lens, ctx_lens, extra = CASES[case]
    c = selfcheck.make_paged_case(
        q_lens, ctx_lens, 8, 2, 32, dtype=torch.bfloat16, device=DEVICE, seed=5, **extra
    )
    cos, sin = _tables(c.q.shape[0], 32, torch.bfloat16, seed=6)
    k_scale, v_scale = torch.tensor([0.5, 1.5], device=DEVICE), torch.tensor([2.0, 0.25], device=DEVICE)
    caches = [quantize_kv(c.k_cache_ref, k_scale), quantize_kv(c.v_cache_ref, v_scale)]
    meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc)
    tail = (c.scale, c.sliding_window, c.softcap, c.sinks)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    fused_caches = [t.clone() for t in caches]
    fused = torch.full((*c.q.shape[:-1], 32), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    paged_attention.paged_attention_out(
        c.q, c.k, c.v, *fused_caches, *meta, *tail, fused, cos=cos, sin=sin, **scales, **SMALL_LAUNCH
    )
    q4, k4 = c.q.transpose(0, 1)[None], c.k.transpose(0, 1)[None]
    q_rot, k_rot = torch.empty_like(q4), torch.empty_like(k4)
    rotary.rotary_embedding_out(q4, k4, cos[None, None], sin[None, None], q_rot, k_rot)
    plain_caches = [t.clone() for t in caches]
    plain = torch.full_like(fused, float("nan"))
    paged_attention.paged_attention_out(
        q_rot[0].transpose(0, 1), k_rot[0].transpose(0, 1), c.v, *plain_caches, *meta, *tail, plain,
        write_in_decode=False, **scales, **SMALL_LAUNCH,
    )  # fmt: skip
    assert not fused.isnan().any()
    if (
        DEVICE != "cpu"
    ):  # compiled kernels may contract the rotation differently: one bf16 ulp moves an e4m3 step
        assert selfcheck.rel_err(fused, plain) < TOL[torch.bfloat16]
        return
    for a, b in zip(fused_caches, plain_caches):  # the interpreter: same operations, no FMA contraction
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(fused, plain)


def test_public_op_falls_back_with_a_count(kernels: tuple[Any, Any, Any]) -> None:
    """cos/sin of another dtype than q: the reference runs, logged and counted (not silently)."""
    paged_attention, _, selfcheck = kernels
    c = selfcheck.make_paged_case([1, 1], [5, 9], 4, 2, 16, device=DEVICE, seed=3)
    cos, sin = _tables(2, 16, torch.float64, seed=1)
    before = sum(paged_attention.FALLBACKS.values())
    args = (c.q, c.k, c.v, c.k_cache_ref.clone(), c.v_cache_ref.clone(), c.slot_mapping, c.block_tables,
            c.seq_lens, c.query_start_loc)  # fmt: skip
    out = paged_attention.paged_attention_rope(*args, cos, sin, c.scale)
    ref = paged_attention_rope_reference(*args, cos, sin, c.scale)
    assert sum(paged_attention.FALLBACKS.values()) == before + 1
    assert torch.equal(out, ref)


PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [7, 8, 9]]
GREEDY = SamplingParams(max_tokens=12, min_tokens=12, temperature=0)
BASE = ["model.device=cpu", "compile.backend=eager", "cache.block_size=16", "cache.num_blocks=64"]


def _run(preset: str, *overrides: str) -> tuple[LLM, list[list[int]]]:
    llm = LLM(overrides=[f"model.model={preset}", *BASE, *overrides])
    outs = llm.generate(PROMPTS, GREEDY)
    return llm, [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize(
    "preset", ["tiny-llama", "tiny-qwen3", "tiny-gemma2", "tiny-mistral", "tiny-phi3", "tiny-qwen2"]
)
def test_greedy_equal_with_fusion_on_and_off(preset: str) -> None:
    """tiny-qwen3 rotates per-head-normed q/k; tiny-gemma2 has a window, soft-caps and layers of two kinds;
    tiny-mistral a 16-token window (the 19-token prompt plus 12 tokens pass it); tiny-phi3 slices q/k/v out
    of one fused projection; tiny-qwen2 has q/k/v biases."""
    fused, fused_ids = _run(preset, "compile.passes.fuse_rope_attention.options.force=true")
    plain, plain_ids = _run(preset, "compile.passes.fuse_rope_attention=false")
    assert fused_ids == plain_ids
    assert all(len(ids) == 12 for ids in fused_ids)
    num_layers = fused.info.pass_report.matches("insert_cached_attention")
    assert num_layers > 0 and fused.info.pass_report.matches("fuse_rope_attention") == num_layers
    assert plain.info.pass_report.matches("fuse_rope_attention") == 0
    assert (
        fused.info.op_backends.get("paged_attention_rope") and "paged_attention" not in fused.info.op_backends
    )
    assert "paged_attention_rope" not in plain.info.op_backends


def test_partial_rotary_left_unfused_and_correct() -> None:
    """Phi-3 rotating half of each head: the rotated half reaches attention through a cat with the pass-through
    half, which the kernels do not do; the pass leaves those layers alone (noted) and generation is unchanged."""
    from fxllm.config import load_config
    from fxllm.models import load_model

    hf = load_model("tiny-phi3").model
    data = hf.config.to_dict()
    data["partial_rotary_factor"] = 0.5
    data["rope_parameters"] = {**data["rope_parameters"], "partial_rotary_factor": 0.5}
    torch.manual_seed(0)
    model = type(hf)(hf.config.__class__(**data)).eval()
    assert model.model.rotary_emb.inv_freq.numel() == 8  # 16 of the 32 head dims rotate
    force = "compile.passes.fuse_rope_attention.options.force=true"
    outs = []
    for overrides in ([force], ["compile.passes.fuse_rope_attention=false"]):
        llm = LLM(copy.deepcopy(model), config=load_config(None, [*BASE, *overrides]))
        outs.append([list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)])
        if overrides == [force]:
            report = llm.info.pass_report
            assert report.matches("fuse_rope_attention") == 0
            notes = [n for r in report.records if r.name == "fuse_rope_attention" for n in r.notes]
            assert any("partial rotary" in n for n in notes), notes
    assert outs[0] == outs[1]


def test_cpu_graph_left_alone_without_force() -> None:
    llm, _ = _run("tiny-llama")
    report = llm.info.pass_report
    assert report.matches("fuse_rope_attention") == 0
    notes = [n for r in report.records if r.name == "fuse_rope_attention" for n in r.notes]
    assert any("no fused RoPE + attention kernel on cpu" in n for n in notes), notes


def test_unknown_option_fails_naming_it() -> None:
    with pytest.raises(Exception, match="unknown option 'forse'"):
        LLM(
            overrides=[
                "model.model=tiny-llama",
                *BASE,
                "compile.passes.fuse_rope_attention.options.forse=true",
            ]
        )
