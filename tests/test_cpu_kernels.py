"""The C++ CPU paged-attention backend against the plain-torch reference, both as the Python-bound
kernel and as the native dispatcher kernel that compiled graphs call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fxllm.ops  # noqa: F401
from fxllm.backends.cpu import paged_attention as cpu
from fxllm.backends.registry import choose_backend
from fxllm.ops.paged_attention import paged_attention_reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")


NativeOp = Callable[[str], Callable[..., torch.Tensor]]  # the `native_op` fixture (conftest.py)


def _attention(impl: str, native_op: NativeOp) -> Callable[..., torch.Tensor]:
    """The Python-bound kernel, or the op through the dispatcher with the native kernel installed."""
    return cpu.paged_attention if impl == "python" else native_op("paged_attention")


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


@pytest.mark.parametrize("impl", ["python", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(6, 2, 64), (4, 4, 40), (8, 2, 128)])
# (7, 0.0, True): window and sinks without softcap take the bfloat16 dot-product path where the CPU
# has avx512_bf16 (softcap always takes the generic loop).
@pytest.mark.parametrize(("window", "softcap", "sinks"), [(-1, 0.0, False), (7, 20.0, True), (7, 0.0, True)])
def test_cpu_paged_attention_matches_reference(
    native_op: NativeOp,
    impl: str,
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
    out = _attention(impl, native_op)(*cpu_args[:10], window, softcap, cpu_args[10])
    assert torch.equal(ref_args[3], cpu_args[3]) and torch.equal(
        ref_args[4], cpu_args[4]
    )  # same cache writes
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)


def test_cpu_backend_is_chosen_on_cpu() -> None:
    assert choose_backend("paged_attention", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("window", "softcap", "sinks"), [(-1, 0.0, False), (7, 20.0, True)])
def test_generic_decode_kernel_matches_reference(
    dtype: torch.dtype, window: int, softcap: float, sinks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain-loop kernel CPUs without AVX-512 build (this machine may take the AVX-512 paths)."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    from fxllm.backends.cpu.kernels_cpp import DECODE_ARGS, decode_source

    kernels = cpu._kernels()
    assert kernels is not None
    generic = CppPythonBindingsCodeCache.load_pybinding(
        DECODE_ARGS, decode_source(avx512=False, avx512_bf16=False)
    )
    monkeypatch.setattr(cpu, "_kernels", lambda: (kernels[0], generic))
    ref_args, cpu_args = _case(dtype, num_heads=6, num_kv_heads=2, head_dim=64, decode=True, sinks=sinks)
    ref = paged_attention_reference(*ref_args[:10], window, softcap, ref_args[10])
    out = cpu.paged_attention(*cpu_args[:10], window, softcap, cpu_args[10])
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("impl", ["python", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_of_fresh_and_continuing_sequences_with_padding(
    native_op: NativeOp, impl: str, dtype: torch.dtype
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
    out = _attention(impl, native_op)(*padded(cpu_args), -1, 0.0, None)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_native_kernel_hands_other_dtypes_to_the_reference(native_op: NativeOp, dtype: torch.dtype) -> None:
    """The C++ kernels take float32 and bfloat16; other dtypes go to the op's reference, same result."""
    ref_args, cpu_args = _case(dtype, num_heads=6, num_kv_heads=2, head_dim=64, decode=True, sinks=False)
    ref = paged_attention_reference(*ref_args[:10], -1, 0.0, None)
    out = native_op("paged_attention")(*cpu_args[:10], -1, 0.0, None)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(ref_args[3], cpu_args[3])


def test_binding_the_reference_removes_the_native_kernel(native_op: NativeOp) -> None:
    """bind_op_backends can switch an op back to its reference after the native kernel was installed."""
    from fxllm.backends.registry import bind_op_backends

    native_op("paged_attention")

    def has_cpu_kernel() -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fxllm::paged_attention", "CPU")

    assert has_cpu_kernel()
    try:
        bind_op_backends("cpu", {"paged_attention": "torch"})
        assert not has_cpu_kernel()  # the op's CompositeExplicitAutograd reference runs
    finally:
        bind_op_backends("cpu")
    assert has_cpu_kernel()
