"""Triton kernels for fxllm's canonical ops, registered as the "triton" op backend for CUDA devices.

Importing this package defines `fxllm_triton::<op>` for rms_norm, fused_add_rms_norm,
rotary_embedding, silu_and_mul, gelu_and_mul, paged_attention and paged_attention_rope and registers
them as the "triton" implementation (priority 10, so the lowering pass picks them for CUDA nodes). Without
triton installed the import still succeeds and registers nothing. On a CPU-only machine the tests
run the same kernel functions on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from fxllm.backends.registry import OpSite

logger = logging.getLogger(__name__)

BACKEND = "triton"
PRIORITY = 10


def supports(site: OpSite) -> bool:
    """CUDA nodes only."""
    return site.device.type == "cuda"


def patch_interpreter() -> None:
    """Make Triton 3.6's interpreter run these kernels as the GPU would; tests only, idempotent.

    Called under TRITON_INTERPRET=1 only. (0) torch imports triton as soon as a custom op is defined,
    often before a test sets TRITON_INTERPRET=1, so triton.language's own @jit helpers (tl.sum,
    tl.zeros, ...) are compiled-mode functions that the interpreter refuses to call: re-wrap them
    as interpreted functions. (1) Scalars are shape-(1,) arrays
    converted with int(), which numpy >= 2.4 rejects, so `range(lo, hi)` over run-time bounds fails
    (triton#9171, fixed upstream the same way). (2) float32 -> bfloat16 casts truncate, where the GPU
    rounds to nearest even. (3) tl.dot multiplies bfloat16 operands as raw uint16 bit patterns; the
    fix upcasts them to float32 (exact, as tensor-core bf16 products are). (4) casts to and from
    float8e4nv convert the uint8 bit pattern as an integer; the fix converts through torch's
    float8_e4m3fn (round to nearest even, as the GPU's cvt.rn).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_fxllm_patched", False):
        return
    original_patch = interpreter._patch_lang_tensor
    original_cast = builder.cast_impl
    original_dot = builder.create_dot
    original_fp_to_fp = builder.create_fp_to_fp

    def patch_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def bf16_to_f32(data):  # type: ignore[no-untyped-def]
        return (data.astype(np.uint32) << 16).view(np.float32)

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def fp_to_fp(self, src, dst_type, rounding_mode):  # type: ignore[no-untyped-def]
        if tl.float8e4nv not in (src.dtype.scalar, dst_type.scalar):
            return original_fp_to_fp(self, src, dst_type, rounding_mode)
        data = np.ascontiguousarray(src.data)
        if src.dtype.scalar == tl.float8e4nv:
            wide = torch.from_numpy(data.view(np.uint8)).view(torch.float8_e4m3fn).float()
        elif src.dtype.scalar == tl.bfloat16:
            wide = torch.from_numpy(bf16_to_f32(data))
        else:
            wide = torch.from_numpy(data.astype(np.float32))
        if dst_type.scalar == tl.float8e4nv:
            packed = wide.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(packed, tl.float8e4nv)
        return cast_impl(self, interpreter.TensorHandle(wide.numpy(), tl.float32), dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(bf16_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(bf16_to_f32(b.data), tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    for module in (tl, tl.standard, tl.random):
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                setattr(module, name, interpreter.InterpretedFunction(obj.fn))
    # tl re-exports the helpers: point its names at the same objects as tl.standard's (the
    # interpreter recognises sum/max/min reductions by identity with tl.standard's combine functions).
    for name in dir(tl):
        for module in (tl.standard, tl.random):
            if isinstance(getattr(tl, name), interpreter.InterpretedFunction) and hasattr(module, name):
                setattr(tl, name, getattr(module, name))
    interpreter._patch_lang_tensor = patch_tensor
    builder.cast_impl = cast_impl
    builder.create_dot = create_dot
    builder.create_fp_to_fp = fp_to_fp
    builder._fxllm_patched = True


def _register() -> bool:
    try:
        import triton  # noqa: F401  (the top-level package, not this one: absolute import)
    except ImportError:
        logger.info("triton is not installed: no triton op backends registered")
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        patch_interpreter()
    import fxllm.ops  # noqa: F401  (ops must exist before backends register for them)
    from fxllm.backends.registry import register_op_backend
    from fxllm.backends.triton import activations, gemv, norms, paged_attention, rotary

    kernels = {
        "rms_norm": norms.rms_norm,
        "fused_add_rms_norm": norms.fused_add_rms_norm,
        "rotary_embedding": rotary.rotary_embedding,
        "silu_and_mul": activations.silu_and_mul,
        "gelu_and_mul": activations.gelu_and_mul,
        "paged_attention": paged_attention.paged_attention,
        "paged_attention_rope": paged_attention.paged_attention_rope,
    }
    for op, fn in kernels.items():
        register_op_backend(op, BACKEND, fn, supports=supports, _builtin=True, priority=PRIORITY)
    # The attention kernels' launch variants other than the default (paged_attention.VARIANTS): only where
    # compile.op_backends names them, e.g. {paged_attention_rope: triton_separate_write}.
    for variant, knobs in paged_attention.VARIANTS.items():
        if variant == BACKEND:
            continue
        for op in ("paged_attention", "paged_attention_rope"):
            register_op_backend(
                op,
                variant,
                functools.partial(kernels[op], **knobs),
                supports=supports,
                _builtin=True,
                priority=0,
            )
    # Only where named (compile.op_backends: {linear: triton}): inside CUDA graphs on the H100 cuBLAS
    # already streams Llama-3.1-8B's weights at 2.5-2.9 TB/s at M = 1 and the GEMV measured 0.84-1.0x of
    # it (benchmarks/gpu_gemv.py, RESULTS.md), so by default the reference (aten.linear, cuBLAS) runs.
    register_op_backend("linear", BACKEND, gemv.linear, supports=supports, _builtin=True, priority=0)
    from fxllm.backends.triton import fp8_gemm, quant_fused

    # Producers with the FP8 activation quantization fused in (emitted by fuse_fp8_quant when it is on).
    register_op_backend("fused_add_rms_norm_fp8", BACKEND, quant_fused.fused_add_rms_norm_fp8, _builtin=True, priority=PRIORITY,
                        supports=lambda site: supports(site) and len(site.args) >= 3 and quant_fused.norm_supported(*site.args[:3]))  # fmt: skip
    register_op_backend("rms_norm_fp8", BACKEND, quant_fused.rms_norm_fp8, _builtin=True, priority=PRIORITY,
                        supports=lambda site: supports(site) and len(site.args) >= 2 and quant_fused.norm_supported(site.args[0], None, site.args[1]))  # fmt: skip
    register_op_backend("silu_and_mul_fp8", BACKEND, quant_fused.silu_and_mul_fp8, _builtin=True, priority=PRIORITY,
                        supports=lambda site: supports(site) and len(site.args) >= 2 and quant_fused.silu_supported(*site.args[:2]))  # fmt: skip
    register_op_backend("gelu_and_mul_fp8", BACKEND, quant_fused.gelu_and_mul_fp8, _builtin=True, priority=PRIORITY,
                        supports=lambda site: supports(site) and len(site.args) >= 2 and quant_fused.silu_supported(*site.args[:2])
                        and (len(site.args) < 3 or site.args[2] in ("none", "tanh")))  # fmt: skip

    def fp8_site(site: OpSite, check: Callable[..., bool]) -> bool:
        xq, x_scale, weight, weight_scale, _bias, out_dtype = site.args
        return supports(site) and check(xq, x_scale, weight, weight_scale, out_dtype)

    # FP8 GEMMs (fxllm/backends/triton/fp8_gemm.py says why): _scaled_mm with fast accumulation wherever it
    # takes the shape; the Triton weight stream where it does not (K or N not a multiple of 16); plain
    # _scaled_mm or the stream where compile.op_backends names them.
    register_op_backend("fp8_gemm", "scaled_mm", fp8_gemm.scaled_mm_gemm, _builtin=True, priority=PRIORITY,
                        supports=lambda site: fp8_site(site, fp8_gemm.supported_by_scaled_mm))  # fmt: skip
    register_op_backend("fp8_gemm", "scaled_mm_fast_accum", fp8_gemm.scaled_mm_fast_accum_gemm, _builtin=True,
                        priority=PRIORITY + 1,
                        supports=lambda site: fp8_site(site, fp8_gemm.supported_by_scaled_mm))  # fmt: skip
    register_op_backend("fp8_gemm", BACKEND, fp8_gemm.triton_gemm, _builtin=True, priority=PRIORITY - 5,
                        supports=lambda site: fp8_site(site, fp8_gemm.supported))  # fmt: skip
    return True


AVAILABLE = _register()
