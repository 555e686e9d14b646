"""The C++ CPU ops `fxllm_cpu::paged_attention` (and the library's other ops' contracts) against the
plain-torch reference: the AVX-512 paths where this CPU has them, the plain loops everywhere, the hand-off
of what the kernels do not take to the canonical op, and the fake (meta) implementations."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch._subclasses import FakeTensorMode

import fxllm.ops  # noqa: F401
from fxllm.backends.cpu.isa import has_avx512, has_avx512_bf16
from fxllm.ops.paged_attention import paged_attention_reference

NativeOp = Callable[[str], torch._ops.OpOverload]  # the `native_op` fixture (conftest.py)


def _case(
    dtype: torch.dtype,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    decode: bool,
    sinks: bool,
    lens: tuple[list[int], list[int]] | None = None,
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """Two identical argument tuples (separate caches) for a batch of sequences over a shuffled pool
    (by default 5; `lens` = (context lengths, query lengths) chooses others)."""
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks = 4, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens[0] if lens else [1, 9, 17, 30, 12], dtype=torch.int32)
    num_seqs = seq_lens.shape[0]
    if lens:
        q_lens = torch.tensor(lens[1], dtype=torch.int32)
    else:
        q_lens = (
            torch.ones(num_seqs, dtype=torch.int32)
            if decode
            else torch.tensor([1, 3, 17, 2, 5], dtype=torch.int32)
        )
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * 8].view(num_seqs, 8).int()
    num_tokens = int(q_lens.sum())
    # q/k/v as strided slices of one fused projection, as the graph produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q = q.view(num_tokens, num_heads, head_dim)
    k, v = k.view(num_tokens, num_kv_heads, head_dim), v.view(num_tokens, num_kv_heads, head_dim)
    slots = [
        int(tables[s, p // block_size]) * block_size + p % block_size
        for s in range(num_seqs)
        for p in range(int(seq_lens[s] - q_lens[s]), int(seq_lens[s]))
    ]
    slot_mapping = torch.tensor(slots)
    if lens is None:
        slot_mapping[1] = -1  # a padding slot is not written
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).int()])
    sink = torch.randn(num_heads, generator=gen) if sinks else None

    def args(kc: torch.Tensor, vc: torch.Tensor) -> tuple[object, ...]:
        return (q, k, v, kc, vc, slot_mapping, tables, seq_lens, starts, head_dim**-0.5)

    return (*args(k_cache, v_cache), sink), (*args(k_cache.clone(), v_cache.clone()), sink)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture
def plain_loops(native_op: NativeOp) -> Iterator[None]:
    """Run the kernels' plain loops (what a CPU without AVX-512 runs) for one test, then restore this CPU's paths."""
    native_op("paged_attention")  # loads the library (or skips)
    torch.ops.fxllm_cpu.set_isa(False, False)
    try:
        yield
    finally:
        torch.ops.fxllm_cpu.set_isa(has_avx512(), has_avx512_bf16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(6, 2, 64), (4, 4, 40), (8, 2, 128)])
# (7, 0.0, True): window and sinks without softcap take the bfloat16 dot-product path where the CPU
# has avx512_bf16 (softcap always takes the generic loop).
@pytest.mark.parametrize(("window", "softcap", "sinks"), [(-1, 0.0, False), (7, 20.0, True), (7, 0.0, True)])
def test_cpu_paged_attention_matches_reference(
    native_op: NativeOp,
    dtype: torch.dtype,
    decode: bool,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int,
    softcap: float,
    sinks: bool,
) -> None:
    ref_args, cpu_args = _case(
        dtype, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, decode=decode, sinks=sinks
    )
    ref = paged_attention_reference(*ref_args[:10], window, softcap, ref_args[10])
    out = native_op("paged_attention")(*cpu_args[:10], window, softcap, cpu_args[10])
    assert torch.equal(ref_args[3], cpu_args[3]) and torch.equal(
        ref_args[4], cpu_args[4]
    )  # same cache writes
    assert _relative_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.usefixtures("plain_loops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize(("window", "softcap", "sinks"), [(-1, 0.0, False), (7, 20.0, True)])
def test_plain_loops_match_reference(
    native_op: NativeOp, dtype: torch.dtype, decode: bool, window: int, softcap: float, sinks: bool
) -> None:
    """The loops CPUs without AVX-512 run (this machine may take the AVX-512 paths otherwise)."""
    ref_args, cpu_args = _case(dtype, num_heads=6, num_kv_heads=2, head_dim=64, decode=decode, sinks=sinks)
    ref = paged_attention_reference(*ref_args[:10], window, softcap, ref_args[10])
    out = native_op("paged_attention")(*cpu_args[:10], window, softcap, cpu_args[10])
    assert torch.equal(ref_args[3], cpu_args[3])
    assert _relative_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_of_fresh_and_continuing_sequences_with_padding(
    native_op: NativeOp, dtype: torch.dtype
) -> None:
    """Fresh prompts, a chunk continuing its cached context, a sequence with no query this step, and
    two padding rows past the last sequence (CUDA-graph style: slot -1, output must be zeros)."""
    lens = ([6, 6, 6, 9, 5, 4, 4], [6, 6, 6, 2, 0, 4, 4])
    ref_args, cpu_args = _case(dtype, num_heads=6, num_kv_heads=2, head_dim=64, decode=False, sinks=False,
                               lens=lens)  # fmt: skip

    def padded(args: tuple[object, ...]) -> list[object]:
        q, k, v, kc, vc, slots = args[:6]
        extra = [torch.randn(2, *t.shape[1:]).to(dtype) for t in (q, k, v)]  # type: ignore[union-attr]
        rows = [torch.cat([t, e]) for t, e in zip((q, k, v), extra)]  # type: ignore[list-item]
        return [*rows, kc, vc, torch.cat([slots, torch.tensor([-1, -1])]), *args[6:10]]  # type: ignore[list-item]

    ref = paged_attention_reference(*padded(ref_args), -1, 0.0, None)
    out = native_op("paged_attention")(*padded(cpu_args), -1, 0.0, None)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    assert _relative_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_native_kernel_hands_other_dtypes_to_the_reference(native_op: NativeOp, dtype: torch.dtype) -> None:
    """The C++ kernels take float32 and bfloat16; other dtypes go to the canonical op, same result."""
    ref_args, cpu_args = _case(dtype, num_heads=6, num_kv_heads=2, head_dim=64, decode=True, sinks=False)
    ref = paged_attention_reference(*ref_args[:10], -1, 0.0, None)
    out = native_op("paged_attention")(*cpu_args[:10], -1, 0.0, None)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(ref_args[3], cpu_args[3])


def test_native_kernel_hands_strided_caches_to_the_reference(native_op: NativeOp) -> None:
    """Caches that are views into a wider pool (not contiguous) go to the canonical op, which writes the view."""
    ref_args, cpu_args = _case(
        torch.float32, num_heads=6, num_kv_heads=2, head_dim=64, decode=False, sinks=False
    )
    pools = [torch.zeros(*c.shape[:-1], 2 * c.shape[-1]) for c in cpu_args[3:5]]  # type: ignore[union-attr]
    caches = [pool[..., : c.shape[-1]] for pool, c in zip(pools, cpu_args[3:5])]  # type: ignore[union-attr]
    for cache, values in zip(caches, cpu_args[3:5]):
        cache.copy_(values)  # type: ignore[arg-type]
    assert not caches[0].is_contiguous()
    ref = paged_attention_reference(*ref_args[:10], -1, 0.0, None)
    out = native_op("paged_attention")(*cpu_args[:3], *caches, *cpu_args[5:10], -1, 0.0, None)
    assert torch.equal(out, ref) and out.is_contiguous()
    assert torch.equal(caches[0], ref_args[3]) and torch.equal(caches[1], ref_args[4])
    assert torch.count_nonzero(pools[0][..., 64:]) == 0  # nothing written outside the view


@pytest.mark.parametrize("name", ["packed_linear", "paged_attention"])
def test_schemas_are_the_canonical_ones(native_op: NativeOp, name: str) -> None:
    """The lowering pass swaps fxllm::<op> for fxllm_cpu::<op> in place: same arguments, defaults, no mutation."""
    canonical = str(getattr(torch.ops.fxllm, name).default._schema)
    assert str(native_op(name)._schema) == canonical.replace("fxllm::", "fxllm_cpu::", 1)


def test_nothing_is_installed_on_the_canonical_ops(native_op: NativeOp) -> None:
    """Loading the library adds ops of its own namespace; the canonical ops keep only their references."""
    native_op("paged_attention")
    for name in ("packed_linear", "paged_attention"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"fxllm::{name}", "CPU")


def test_fake_implementations_give_the_output_shapes(native_op: NativeOp) -> None:
    from fxllm.ops.linear import pack_linear_weight

    ref_args, _ = _case(torch.bfloat16, num_heads=6, num_kv_heads=2, head_dim=64, decode=False, sinks=False)
    weight = pack_linear_weight(torch.randn(40, 64))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in ref_args]
        attention = native_op("paged_attention")(*fake[:10], -1, 0.0, None)
        linear = native_op("packed_linear")(
            mode.from_tensor(torch.randn(2, 5, 64)), mode.from_tensor(weight), 40
        )
        argmax = native_op("argmax_rows")(mode.from_tensor(torch.randn(3, 7)))
    assert (attention.shape, attention.dtype) == (
        (28, 6, 64),
        torch.bfloat16,
    )  # 1 + 3 + 17 + 2 + 5 query tokens
    assert (linear.shape, linear.dtype) == ((2, 5, 40), torch.float32)
    assert (argmax.shape, argmax.dtype) == ((3,), torch.int64)


def test_a_failed_build_is_logged_once_and_leaves_the_references(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """No compiler: available() is False (no exception), op() and argmax_rows() say so, one warning with the reason."""
    from fxllm.backends.cpu import native

    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", None)  # as in a fresh process (restored after the test)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
        assert native.op("packed_linear") is None and native.argmax_rows(torch.zeros(2, 3)) is None
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == native.__name__
    ]
    assert len(warnings) == 1 and "/nonexistent/g++: not found" in warnings[0]
    assert native.build_directory().is_relative_to(tmp_path / "torch_extensions")
