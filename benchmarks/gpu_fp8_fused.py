"""gpu_fp8.py's `fused_quant` section: the FP8 activation quantization in ATen (Inductor) vs fused into
fxllm's producer kernels (issue 15; fxllm/backends/triton/quant_fused.py), on Llama-3.1-8B's shapes.

Per GEMM and M (1, 16, 256, 2048), microseconds in a CUDA graph:
  bf16              the bf16 engine path: the Triton producer, F.linear (cuBLAS)
  unfused_producer  the Triton producer (add + RMSNorm or SiLU-and-mul, bf16 out), then quantize_activation
                    compiled by Inductor (one kernel of its own: what the FP8 engine runs with the option off)
  fused_producer    the fused Triton kernel (fuse_activation_quant on)
  fused_2pass_producer  (down only) the SiLU kernel walking the row twice instead of holding it in registers
  unfused / fused / fused_2pass   each followed by the same fp8_gemm "scaled_mm" backend (_scaled_mm)
and whether the two agree: the fraction of e4m3 bytes that differ, the largest relative scale difference,
and the GEMM outputs' relative difference (Inductor's division is div.full.f32 by default, the fused
kernel's div_rn: rare one-step differences are expected, quant_fused.py's docstring).
The SiLU kernel's variants (down only; quant_fused.GATED_VARIANTS): each producer alone (`fused_<name>_producer`)
at M = 1, 16, 256, 2048 and also 1000 and 8192 (there with the default and two-pass producers only), and
`variant_bytes_differ` / `variant_scales_differ`: its e4m3 bytes and scales that are not the default kernel's
(0 expected: the variants are bit-exact by construction, quant_fused.GatedVariant).
qkv and gate_up read the post-attention / input add + RMSNorm's output (hidden 4096); down reads
SiLU-and-mul of the gate_up output (intermediate 14336, gate and up as strided halves of one [M, 28672]).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("fxllm.gpu.fp8")

FUSED_CASES = {"qkv": ("norm", 4096, 6144), "gate_up": ("norm", 4096, 28672), "down": ("silu", 14336, 4096)}
FUSED_ROWS = (1, 16, 256, 2048)
VARIANT_ROWS = (1000, 8192)  # SiLU variants only: the engine's decode batch and a long prefill chunk
SMOKE_CASES = {"qkv": ("norm", 64, 96), "down": ("silu", 128, 64)}
SMOKE_ROWS = (1, 5)
SMOKE_VARIANT_ROWS = (3,)

Quant = tuple[torch.Tensor, torch.Tensor]


def _producers(
    kind: str, m: int, k: int, device: str, quant: Callable[[torch.Tensor], Quant]
) -> tuple[Callable[[], torch.Tensor], Callable[[], Quant], Callable[[], Quant]]:
    """(bf16 producer, unfused producer + Inductor quantization, fused producer) on fresh random inputs."""
    from fxllm.backends.triton import activations, norms, quant_fused

    gen = torch.Generator(device=device).manual_seed(m)
    if kind == "norm":
        x, res = (torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(2))
        w = 1 + 0.1 * torch.randn(k, device=device, generator=gen, dtype=torch.bfloat16)
        return (
            lambda: norms.fused_add_rms_norm(x, res, w, 1e-5)[0],
            lambda: quant(norms.fused_add_rms_norm(x, res, w, 1e-5)[0]),
            lambda: quant_fused.fused_add_rms_norm_fp8(x, res, w, 1e-5)[:2],
        )
    gate_up = torch.randn(m, 2 * k, device=device, generator=gen, dtype=torch.bfloat16) * 2
    gate, up = gate_up[:, :k], gate_up[:, k:]
    return (
        lambda: activations.silu_and_mul(gate, up),
        lambda: quant(activations.silu_and_mul(gate, up)),
        lambda: quant_fused.silu_and_mul_fp8(gate, up),
    )


def _then_gemm(
    producer: Callable[[], Quant], wq: torch.Tensor, ws: torch.Tensor
) -> Callable[[], torch.Tensor]:
    from fxllm.backends.triton.fp8_gemm import scaled_mm_gemm

    return lambda: scaled_mm_gemm(*producer(), wq, ws, None, torch.bfloat16)


def _two_pass(fn: Callable[[], Quant]) -> Callable[[], Quant]:
    """fn with the SiLU kernel's row walk (ONE_PASS_MAX = 0): read while the CUDA graph is captured."""
    from fxllm.backends.triton import quant_fused

    def call() -> Quant:
        saved, quant_fused.ONE_PASS_MAX = quant_fused.ONE_PASS_MAX, 0
        try:
            return fn()
        finally:
            quant_fused.ONE_PASS_MAX = saved

    return call


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def fused_quant_section(
    device: str, smoke: bool, time_us: Callable[[Callable[[], Any], str], float]
) -> dict[str, Any]:
    """Time and compare the unfused and fused producer + quantization (+ the same _scaled_mm) per shape and M."""
    from fxllm.quantization.fp8 import quantize_activation, quantize_weight

    quant = torch.compile(quantize_activation, backend="eager" if smoke else "inductor", dynamic=True)
    results: dict[str, Any] = {}
    for name, (kind, k, n) in (SMOKE_CASES if smoke else FUSED_CASES).items():
        gen = torch.Generator(device=device).manual_seed(5)
        w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) / k**0.5
        wq, ws = quantize_weight(w, "channel")
        rows = SMOKE_ROWS if smoke else FUSED_ROWS
        if kind == "silu":
            rows = rows + (SMOKE_VARIANT_ROWS if smoke else VARIANT_ROWS)
        for m in rows:
            bf16, unfused, fused = _producers(kind, m, k, device, quant)
            paths: dict[str, Callable[[], Any]] = {
                "bf16": lambda bf16=bf16, w=w: F.linear(bf16(), w),
                "unfused_producer": unfused,
                "fused_producer": fused,
                "unfused": _then_gemm(unfused, wq, ws),
                "fused": _then_gemm(fused, wq, ws),
            }
            if kind == "silu":  # the SiLU kernel's two-pass walk (wide rows) on the same shape
                paths["fused_2pass_producer"] = _two_pass(fused)
                paths["fused_2pass"] = _then_gemm(_two_pass(fused), wq, ws)
                variants = _variants(m, k, device)
                paths |= {f"fused_{v}_producer": fn for v, fn in variants.items()}
                if m in SMOKE_VARIANT_ROWS + VARIANT_ROWS:  # the producers alone at these M
                    paths = {label: fn for label, fn in paths.items() if label.endswith("producer")}
                    paths.pop("unfused_producer")
            row = _time_paths(paths, device, time_us)
            if kind == "silu":
                row |= _variant_agreement(fused, variants)
            if "unfused" in paths:
                row |= _agreement(unfused, fused, paths)
            if isinstance(row.get("unfused"), float) and isinstance(row.get("fused"), float):
                row["fused_speedup"] = row["unfused"] / row["fused"]
            results[f"{name} M={m}"] = row
            logger.info("fused_quant %s M=%d: %s", name, m, row)
    return results


def _variants(m: int, k: int, device: str) -> dict[str, Callable[[], Quant]]:
    """The SiLU kernel's variants other than the default one, on _producers' inputs (same seed)."""
    from fxllm.backends.triton import quant_fused

    gen = torch.Generator(device=device).manual_seed(m)
    gate_up = torch.randn(m, 2 * k, device=device, generator=gen, dtype=torch.bfloat16) * 2
    gate, up = gate_up[:, :k], gate_up[:, k:]
    return {
        name: lambda name=name: quant_fused.silu_and_mul_fp8(gate, up, variant=name)
        for name in quant_fused.GATED_VARIANTS
        if name != quant_fused.DEFAULT_SILU_VARIANT
    }


def _time_paths(
    paths: dict[str, Callable[[], Any]], device: str, time_us: Callable[[Callable[[], Any], str], float]
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for label, fn in paths.items():
        try:
            fn()  # compiles Inductor's quantization / the Triton kernel for this shape before the graph capture
            row[label] = time_us(fn, device)
        except Exception as exc:  # one path failing must not end the section
            row[label] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def _variant_agreement(
    fused: Callable[[], Quant], variants: dict[str, Callable[[], Quant]]
) -> dict[str, Any]:
    """Per variant, how many e4m3 bytes and scales are not the default kernel's (0 expected)."""
    out: dict[str, Any] = {"variant_bytes_differ": {}, "variant_scales_differ": {}}
    qa, sa = fused()
    for name, fn in variants.items():
        try:
            qb, sb = fn()
            out["variant_bytes_differ"][name] = int((qa.view(torch.uint8) != qb.view(torch.uint8)).sum())
            out["variant_scales_differ"][name] = int((sa.view(torch.int32) != sb.view(torch.int32)).sum())
        except Exception as exc:
            out["variant_bytes_differ"][name] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def _agreement(
    unfused: Callable[[], Quant], fused: Callable[[], Quant], paths: dict[str, Callable[[], Any]]
) -> dict[str, Any]:
    """The unfused and the fused quantization: e4m3 bytes that differ, scales, GEMM outputs."""
    try:
        (qa, sa), (qb, sb) = unfused(), fused()
        return {
            "e4m3_bytes_differ": float((qa.view(torch.uint8) != qb.view(torch.uint8)).float().mean()),
            "scale_max_rel_diff": float(((sa - sb).abs() / sa).max()),
            "gemm_rel_diff": _rel(paths["fused"](), paths["unfused"]()),
        }
    except Exception as exc:
        return {"compare_error": f"{type(exc).__name__}: {exc}"[:300]}


def fused_quant_table(rows: dict[str, Any]) -> list[str]:
    """The section's rows as text lines (us; fused speed-up over unfused; e4m3 bytes that differ), then the
    SiLU variants' producers (us; the best variant's speed-up over the default kernel; bytes not the default's)."""
    labels = (
        "bf16",
        "unfused_producer",
        "fused_producer",
        "fused_2pass_producer",
        "unfused",
        "fused",
        "fused_2pass",
    )
    lines = [
        f"{'fused_quant':<16}"
        + "".join(f" {label:>20}" for label in labels)
        + f" {'speedup':>8} {'bytes_diff':>10}"
    ]
    for case, row in rows.items():
        if "unfused" not in row:
            continue
        speed = f"{row['fused_speedup']:>8.2f}" if "fused_speedup" in row else f"{'-':>8}"
        differ = f"{row['e4m3_bytes_differ']:>10.2e}" if "e4m3_bytes_differ" in row else f"{'-':>10}"
        lines.append(
            f"{case:<16}" + "".join(f" {_cell(row, label)}" for label in labels) + f" {speed} {differ}"
        )
    variant_rows = {case: row for case, row in rows.items() if "variant_bytes_differ" in row}
    if variant_rows:
        names = list(next(iter(variant_rows.values()))["variant_bytes_differ"])
        labels = ("fused_producer", "fused_2pass_producer", *(f"fused_{name}_producer" for name in names))
        heads = ("default", "2pass", *names)
        lines.append(
            f"{'silu variants':<16}" + "".join(f" {h:>20}" for h in heads) + f" {'best':>8} {'differ':>10}"
        )
        for case, row in variant_rows.items():
            times = [
                row[f"fused_{name}_producer"]
                for name in names
                if isinstance(row.get(f"fused_{name}_producer"), float)
            ]
            default = row.get("fused_producer")
            best = f"{default / min(times):>8.2f}" if times and isinstance(default, float) else f"{'-':>8}"
            diffs = list(row["variant_bytes_differ"].values()) + list(row["variant_scales_differ"].values())
            differ = (
                sum(d for d in diffs if isinstance(d, int))
                if all(isinstance(d, int) for d in diffs)
                else "ERROR"
            )
            lines.append(
                f"{case:<16}" + "".join(f" {_cell(row, label)}" for label in labels) + f" {best} {differ:>10}"
            )
    return lines


def _cell(row: dict[str, Any], label: str) -> str:
    value = row.get(label)
    return f"{value:>20.1f}" if isinstance(value, float) else f"{'ERROR' if label in row else '-':>20}"
