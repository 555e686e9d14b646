"""Decode attention sweep at serving batch sizes: key-loop variants x launches, bf16 vs FP8 KV cache (issues 14, 15).

The 1,000 x 128/128 profile on one H200 (benchmarks/RESULTS.md, eleventh session) spent 1.38 s of GPU time in
the decode kernel with an FP8 KV cache against 1.13 s with a bf16 one: the FP8 kernel read ~1.1-1.6 TB/s where
bf16 reads ~2.8-3.8. This times the decode op (KV write + split-KV attention + combine) on Llama-3.1-8B heads
(32 query, 8 KV heads, head dim 128, block 16) for each key-loop variant (paged_attention_decode_loops.py) and
a small launch grid per variant (BLOCK_N x warps x stages):
  default   the current loop (over FP8: the tiles converted to float16, `fp8_f16`, today's default)
  swap_ab   scores transposed, s^T = K q^T and acc^T = V^T P^T (the big tile is the dots' A operand)
  swap_ab_wide  FP8 cache only: swap_ab with the tiles renumbered so that the e4m3 bytes reach registers in
            wide shared-memory loads (WIDE; benchmarks/fp8_decode_ptx.py counts the loads)
  fp8_dot   FP8 cache only: e4m3 dots, q and P quantized in-kernel
  fp8_dot+swap_ab  both
Every launch's output is compared with the default launch's on the same cache (max abs diff and relative L2
error); above the variant's tolerance the script reports FAILED and exits 1 (after writing the JSON). For each
launch it also records the dot instructions in the compiled PTX (wgmma shape and operand types, or mma.sync)
and registers / spills, which say whether the variant compiled to the intended wgmma.

Usage (GPU machine, repo root; 39 compiles + 117 timed launches; the 34 + 102 before swap_ab_wide were
budgeted for <= 240 s on one H200):
    PYTHONPATH=. python3 benchmarks/gpu_decode_sweep.py --out $OUT/sweep
CPU check of the script (Triton's interpreter, one tiny case, one launch per variant): add --smoke.
No GPU at all, --sm90: compiles every variant x launch for sm_90a with Triton's bundled ptxas and reports
the dot instructions, where each wgmma's A operand lives, shared memory, registers and spills (~2 min).
Writes DIR/decode_sweep.json and prints one table row per case, cache dtype and variant (its best launch).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # Triton's interpreter: set before any kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import json
import logging
import random
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fxllm.backends.triton import paged_attention as tpa
from fxllm.backends.triton.selfcheck import PagedCase, make_paged_case, rel_err
from fxllm.ops.kv_quant import quantize_kv

logger = logging.getLogger("fxllm.gpu.decode_sweep")
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
# Sequences x context lengths: the 1,000 x 128/128 run's middle (contexts 129-256), mid and long batches.
CASES = {"1000 x 129-256": (1000, 129, 256), "256 x 1024": (256, 1024, 1024), "64 x 2048": (64, 2048, 2048)}
SMOKE_CASES = {"4 x 20-90": (4, 20, 90)}
# Variant -> (paged_attention_out flags, cache dtypes it runs on, tolerance on the relative L2 error vs the
# default launch). Without FP8 dots every variant does the default's arithmetic in another order: bf16 P and
# output roundings, ~2e-3 (the interpreter tests' 1e-2 bound). FP8 dots round q and P to e4m3 (3 mantissa
# bits, <= 2^-4 relative each): measured 0.024 relative on random data (tests/test_decode_variants.py), 5e-2
# leaves 2x headroom; a broken variant is off by O(1).
VARIANTS: dict[str, tuple[dict[str, bool | int], tuple[str, ...], float]] = {
    "default": (
        {"swap_ab": False, "fp8_dot": False},
        ("bf16", "fp8"),
        1e-2,
    ),  # explicit: whatever the rule says
    "swap_ab": ({"swap_ab": True}, ("bf16", "fp8"), 1e-2),
    # swap_ab's arithmetic over renumbered head dims: the same bound.
    "swap_ab_wide": ({"swap_ab": True, "wide": True}, ("fp8",), 1e-2),
    "fp8_dot": ({"fp8_dot": True}, ("fp8",), 5e-2),
    "fp8_dot+swap_ab": ({"fp8_dot": True, "swap_ab": True}, ("fp8",), 5e-2),
    # One split (large batches) without DIRECT: partials + the combine kernel, as before DIRECT.
    "default_combine": ({"swap_ab": False, "fp8_dot": False, "direct": False}, ("bf16",), 1e-2),
    "swap_ab_wide_combine": ({"swap_ab": True, "wide": True, "direct": False}, ("fp8",), 1e-2),
    # The L2 prefetch of the first key tiles (`prefetch_tiles`; by default 2 for the swap-AB loops, none for the
    # default loop): other depths, and on for the default loop. Same arithmetic: the same bound.
    "default_pf2": ({"swap_ab": False, "fp8_dot": False, "prefetch_tiles": 2}, ("bf16",), 1e-2),
    "swap_ab_wide_pf0": ({"swap_ab": True, "wide": True, "prefetch_tiles": 0}, ("fp8",), 1e-2),
    "swap_ab_wide_pf1": ({"swap_ab": True, "wide": True, "prefetch_tiles": 1}, ("fp8",), 1e-2),
    "swap_ab_wide_pf4": ({"swap_ab": True, "wide": True, "prefetch_tiles": 4}, ("fp8",), 1e-2),
}


def _grid(triples: list[tuple[int, int, int]]) -> list[dict[str, int]]:
    return [{"block_n": n, "num_warps": w, "num_stages": s} for n, w, s in triples]


def _capped(quads: list[tuple[int, int, int, int]]) -> list[dict[str, int]]:
    """Launches with ptxas's register cap (max_registers): 96 fits 5 four-warp programs an SM, 80 six."""
    return [{"block_n": n, "num_warps": w, "num_stages": s, "max_registers": r} for n, w, s, r in quads]


_WIDE = [(n, w, s) for n in (64, 128) for w in (4, 8) for s in (2, 3)]  # swap_ab: wgmma's M = BLOCK_N >= 64
# Per variant: the launches to time ({} is the launch code's default). The default loop's grid was swept in
# the eleventh session (RESULTS.md): only its best launches are kept here.
LAUNCHES: dict[str, list[dict[str, int]]] = {
    "default": [
        {},
        *_grid([(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 4, 3)]),
        *_grid([(64, 8, 5), (32, 4, 5)]),  # two K/V buffers (decode_sm90.tile_buffers): 2-4 stages give one
        *_capped([(64, 4, 2, 96), (64, 8, 2, 96), (64, 8, 2, 80)]),
    ],
    "swap_ab": _grid(_WIDE),
    # WIDE's renumbering is laid out for 4 warps (with 8 its V reads are 2 bytes wide): one 8-warp launch.
    "swap_ab_wide": [
        *_grid([(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (64, 8, 2)]),
        *_grid([(64, 4, 5), (64, 4, 7)]),  # two and three K/V buffers (1 with 2-4 stages)
        *_capped([(64, 4, 2, 96), (64, 4, 3, 96), (64, 4, 2, 88)]),
    ],
    # Without SWAP_AB the e4m3 dots have M = BLOCK_H = 16 < wgmma's 64: compiled for sm_90a (--sm90) Triton
    # upcasts them to f16 mma.sync, i.e. the default loop plus the quantization; two launches show it.
    "fp8_dot": _grid([(32, 4, 2), (64, 4, 3)]),
    "fp8_dot+swap_ab": _grid(_WIDE),
    "default_combine": [{}],
    "swap_ab_wide_combine": _grid([(64, 4, 2)]),
    "default_pf2": [{}],
    **{f"swap_ab_wide_pf{n}": [{}, *_grid([(64, 4, 2)])] for n in (0, 1, 4)},
}
SMOKE_LAUNCHES: dict[str, list[dict[str, int]]] = {
    "default": [{}],
    "swap_ab": _grid([(32, 4, 2)]),
    "swap_ab_wide": _grid([(32, 4, 2)]),
    "fp8_dot": _grid([(32, 4, 2)]),
    "fp8_dot+swap_ab": _grid([(32, 4, 2)]),
    "default_combine": [{}],
    "swap_ab_wide_combine": _grid([(32, 4, 2)]),
    "default_pf2": [{}],
    **{f"swap_ab_wide_pf{n}": _grid([(32, 4, 2)]) for n in (0, 1, 4)},
}
_DOT_RE = re.compile(
    r"\b(wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.\w+\.\w+|mma\.sync\.aligned\.m\d+n\d+k\d+\S*)"
)


def _short(exc: Exception) -> str:
    """An error's head and tail: a Triton CompilationError quotes the kernel source first and states the
    cause last (call C's failures of 2026-11-28 kept only the quoted source)."""
    text = str(exc)
    return text if len(text) <= 1200 else f"{text[:300]} ... {text[-900:]}"


def _time_us(fn: Any) -> float:
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=10, rep=40))


def _compiled() -> dict[Any, Any]:
    """The decode kernel's compiled variants so far, by key (empty under the interpreter)."""
    try:  # Triton 3.6's JITFunction internals: diagnostics only, never fatal
        caches = getattr(tpa._decode_kernel, "device_caches", None) or {}
        return {key: k for cache in caches.values() for key, k in cache[0].items()}
    except Exception:
        return {}


def _dots(kernel: Any) -> dict[str, Any]:
    """The dot instructions (wgmma / mma.sync with shapes and types), registers and spills of a compiled kernel."""
    try:
        ptx = kernel.asm["ptx"]
        return {"dots": sorted(set(_DOT_RE.findall(ptx))), "regs": getattr(kernel, "n_regs", None),
                "spills": getattr(kernel, "n_spills", None)}  # fmt: skip
    except Exception as exc:  # diagnostics only: a Triton version without these fields
        return {"dots_error": str(exc)[:200]}


def rope_tables(tokens: int, device: str) -> dict[str, torch.Tensor]:
    """cos/sin [tokens, HEAD_DIM] (rotate-half layout, bf16) for the fused RoPE op's launch."""
    gen = torch.Generator().manual_seed(2)
    angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen) * 6.283
    emb = torch.cat([angles, angles], dim=-1)
    return {"cos": emb.cos().to(device, torch.bfloat16), "sin": emb.sin().to(device, torch.bfloat16)}


def decode_case(seqs: int, lo: int, hi: int, device: str) -> tuple[PagedCase, list[int]]:
    """One decode step of `seqs` sequences with contexts drawn in [lo, hi] (seeded: the same case every run)."""
    rng = random.Random(0)
    ctx = [rng.randint(lo, hi) for _ in range(seqs)]
    c = make_paged_case([1] * seqs, ctx, HEADS, KV_HEADS, HEAD_DIM, block_size=BLOCK,
                        dtype=torch.bfloat16, device=device, seed=1)  # fmt: skip
    return c, ctx


def kv_cache(c: PagedCase, kv: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(k cache, v cache, the scale arguments) of the case as a `kv` cache: its bf16 caches or their e4m3 copies."""
    if kv == "bf16":
        return c.k_cache_ref.clone(), c.v_cache_ref.clone(), {}
    one = torch.ones(1, device=c.q.device)
    return quantize_kv(c.k_cache_ref, one), quantize_kv(c.v_cache_ref, one), {"k_scale": one, "v_scale": one}


def kv_bytes(ctx: list[int], kv: str) -> int:
    """The K and V bytes a decode step reads over contexts `ctx` from a `kv` cache."""
    return sum(ctx) * KV_HEADS * HEAD_DIM * 2 * (1 if kv == "fp8" else 2)


def sweep(
    cases: dict[str, tuple[int, int, int]], smoke: bool, device: str, rope: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Per case, cache dtype, variant and launch: time, KV read rate, difference from the default launch.

    `rope`: q and k rotated in-kernel (cos/sin tables), the fused op an engine's decode step runs."""
    results: dict[str, Any] = {}
    failures: list[str] = []
    launches = SMOKE_LAUNCHES if smoke else LAUNCHES
    seen_dots: dict[Any, dict[str, Any]] = {}
    for name, (seqs, lo, hi) in cases.items():
        c, ctx = decode_case(seqs, lo, hi, device)
        meta = (c.slot_mapping, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
        tables = rope_tables(c.q.shape[0], device) if rope else {}
        rows = []
        for dtype_name in ("bf16", "fp8"):
            kc, vc, scales = kv_cache(c, dtype_name)
            read_bytes = kv_bytes(ctx, dtype_name)
            reference = None
            for variant, (flags, dtypes, tol) in VARIANTS.items():
                if dtype_name not in dtypes:
                    continue
                for launch in launches[variant]:
                    row: dict[str, Any] = {"kv": dtype_name, "variant": variant, **launch}
                    out = torch.empty_like(c.q)
                    run = partial(tpa.paged_attention_out, c.q, c.k, c.v, kc, vc, *meta, -1, 0.0, None, out,
                                  **launch, **scales, **flags, **tables)  # fmt: skip
                    before = set(_compiled())
                    try:
                        t0 = time.perf_counter()
                        run()
                        row["first_call_s"] = time.perf_counter() - t0  # includes the compile, if any
                        if reference is None:  # the default variant's default launch comes first
                            reference = out.clone()
                        n = c.num_real
                        row["max_diff"] = float((out[:n].float() - reference[:n].float()).abs().max())
                        row["rel_err"] = rel_err(out[:n].float(), reference[:n].float())
                        row["us"] = _time_us(run) if device == "cuda" else 0.0
                    except Exception as exc:  # a launch the compiler rejects (e.g. shared memory): keep going
                        row["error"] = f"{type(exc).__name__}: {_short(exc)}"
                        logger.warning("%s %s", name, row, exc_info=smoke)
                        rows.append(row)
                        continue
                    new = [k for key, k in _compiled().items() if key not in before]
                    key = (dtype_name, variant, tuple(sorted(launch.items())))
                    if new:
                        seen_dots[key] = _dots(new[0])
                    row.update(seen_dots.get(key, {}))
                    row["kv_TBps"] = read_bytes / (row["us"] * 1e-6) / 1e12 if row["us"] else None
                    if not row["rel_err"] <= tol:  # NaN fails too
                        failures.append(f"{name} {dtype_name} {variant} {launch}: relative error "
                                        f"{row['rel_err']:.3g} > {tol} (max abs diff {row['max_diff']:.3g})")  # fmt: skip
                        logger.error("FAILED %s", failures[-1])
                    logger.info("%s %s", name, row)
                    rows.append(row)
        results[name] = rows
    return results, failures


def _print(results: dict[str, Any]) -> None:
    print(f"{'case':>16} {'kv':>4} {'variant':>16} {'default us':>10} {'best us':>8} {'TB/s':>5} "
          f"{'best launch':>12} {'max diff':>8} {'rel err':>8}  dots of the best launch")  # fmt: skip
    for name, rows in results.items():
        for kv in ("bf16", "fp8"):
            for variant in VARIANTS:
                mine = [r for r in rows if r["kv"] == kv and r["variant"] == variant and "us" in r]
                if not mine:
                    continue
                first = mine[0]
                best = min(mine, key=lambda r: r["us"] or float("inf"))
                launch = (
                    f"{best.get('block_n', '-')}x{best.get('num_warps', '-')}w{best.get('num_stages', '-')}s"
                    + (f"r{best['max_registers']}" if best.get("max_registers") else "")
                )
                print(f"{name:>16} {kv:>4} {variant:>16} {first['us']:10.1f} {best['us']:8.1f} "
                      f"{best['kv_TBps'] or 0:5.2f} {launch:>12} {max(r['max_diff'] for r in mine):8.3g} "
                      f"{max(r['rel_err'] for r in mine):8.3g}  {','.join(best.get('dots', [])) or '-'}")  # fmt: skip


def main() -> int:
    """Run the sweep; JSON to --out, a table on stdout; exit 1 when an output is off by more than its tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny case")
    parser.add_argument("--sm90", action="store_true",
                        help="no GPU: compile every variant x launch for sm_90a, report dots / registers / spills")  # fmt: skip
    parser.add_argument("--variants", default=None, help="comma-separated VARIANTS to time (default: all)")
    parser.add_argument("--rope", action="store_true",
                        help="the fused RoPE op's launch (q and k rotated in-kernel), as an engine runs decode")  # fmt: skip
    args = parser.parse_args()
    if args.variants:  # the default variant always runs first: the others are checked against it
        keep = {"default", *args.variants.split(",")}
        unknown = keep - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
        for name in set(VARIANTS) - keep:
            del VARIANTS[name]
    logging.basicConfig(level=logging.INFO)
    if args.sm90:
        from benchmarks.decode_sm90 import sm90_report

        rows = sm90_report(VARIANTS, LAUNCHES, args.rope)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_sm90.json").write_text(json.dumps(rows, indent=1))
        for r in rows:
            launch = f"{r.get('block_n', 64)}x{r.get('num_warps', 4)}w{r.get('num_stages', 3)}s" + (
                f"r{r['max_registers']}" if r.get("max_registers") else ""
            )
            detail = r.get("error") or (f"{','.join(r['dots']) or '-'} A:{'/'.join(r['wgmma_a']) or '-'} "
                                        f"mma_v2 {r['mma_v2']} smem {r['shared_bytes']} async {r['async_copies']} "
                                        f"buffers {r['tile_buffers']} "
                                        f"regs {r['regs']} spill {r['spill_bytes']}")  # fmt: skip
            print(f"{r['kv']:>4} {r['variant']:>16} {launch:>8}  {detail}")
        return 0
    device = "cpu" if args.smoke else "cuda"
    t0 = time.perf_counter()
    results, failures = sweep(SMOKE_CASES if args.smoke else CASES, args.smoke, device, args.rope)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"results": results, "failures": failures, "elapsed_s": elapsed,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"}  # fmt: skip
    (out / "decode_sweep.json").write_text(json.dumps(doc, indent=1))
    _print(results)
    print(f"sweep took {elapsed:.1f} s")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
