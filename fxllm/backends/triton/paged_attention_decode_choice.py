"""Which key loop the decode kernel runs (issue 15) and with which launch; host code.

Loops (paged_attention_decode_loops.py): "default" (`_attend_range`), "swap_ab" (SWAP_AB), "swap_ab_wide"
(SWAP_AB + WIDE: the same math with the tiles renumbered so that the e4m3 bytes reach registers in wide
shared-memory loads; the FP8 default since the thirteenth session's H200 sweep) and "fp8_dot" (FP8_DOT + SWAP_AB: without
the swap the 16-row e4m3 dot compiles to an f16 mma.sync on sm_90a, i.e. the default loop plus quantization
error; `benchmarks/gpu_decode_sweep.py --sm90`).

The rule, per launch: flags the caller passes win (benchmarks, tests, the `triton_swap_ab` /
`triton_swap_ab_wide` / `triton_fp8_dot` op backends that compile.op_backends can name). Otherwise
`DECODE_LOOPS` names the loop per cache kind and `LAUNCH` its (BLOCK_N, warps, stages) where the caller passes
none, and the loop runs only where it compiles to what it is for: SWAP_AB needs BLOCK_N >= 64 (wgmma's M is
64: below it Triton emits mma.sync), "fp8_dot" an FP8 cache and head dim >= 32 (the e4m3 dot's K). A choice
that the shape rules out runs the default loop, logged and counted in SKIPPED. Each distinct choice is logged
once at INFO. The table holds the H200 sweep's winners (benchmarks/RESULTS.md, twelfth session,
`gpu_decode_sweep.py`, 8B heads): over an FP8 cache "swap_ab" with 64 x 4 warps x 2 stages took 0.83x / 0.79x
/ 0.64x the default loop's time at 1,000 x 129-256 / 256 x 1,024 / 64 x 2,048 (271.5 / 246.7 / 126.8 us, the
last faster than the bf16 cache's 146.0); over bf16 it was slower (1.14-1.43x), as were the FP8 dots (e4m3 V^T
staged byte by byte): those keep the default. Thirteenth session, same sweep: "swap_ab_wide" (64 x 4 x 2) took
0.82x / 0.91x / 0.94x swap-AB's time (223.3 / 225.2 / 118.9 us against 271.7 / 246.6 / 126.5), and in the FP8
engine decode attention of 1,000 x 128/128 went from 1,159 to 934 ms: the FP8 default now.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

logger = logging.getLogger(__name__)

# Loop name -> (SWAP_AB, FP8_DOT, WIDE).
LOOPS: dict[str, tuple[bool, bool, bool]] = {
    "default": (False, False, False),
    "swap_ab": (True, False, False),
    "swap_ab_wide": (True, False, True),
    "fp8_dot": (True, True, False),
}
# Cache kind -> loop. "fp8": float8_e4m3fn caches; "other": bf16 / fp16 / fp32 caches.
DECODE_LOOPS: dict[str, str] = {"fp8": "swap_ab_wide", "other": "default"}
# Loop -> (BLOCK_N, warps, stages) where the caller passes none.
# Sixteenth session (whole-page tiles and row sums after the loop, H200 sweep): the default loop's old
# (64, 4, 3) took 156 registers (3 programs an SM) and 263.9 / 287.0 / 170.0 us at 1,000 x 129-256 /
# 256 x 1,024 / 64 x 2,048; (64, 8, 2) 258.7 / 275.6 / 143.3, never slower than the old launch; (64, 4, 2) was
# fastest at the first two (242.6 / 269.4) but took 192.1 at the third. swap_ab_wide with 3 stages: 183.7 /
# 172.0 / 90.1 against 183.0 / 177.4 / 92.9 with 2. Seventeenth session, from the sm_90a TTGIR: with 2-4 stages
# Triton's pipeliner gives K and V one shared-memory buffer each (the stages go to the block table -> K chain),
# so one tile is in flight while the current one is computed; 5-6 stages give two, 7 three, at 123-125
# registers for swap_ab_wide (still 4 programs an SM). Eighteenth session, the sweep with the fused RoPE op:
# swap_ab_wide at (64, 4, 5) took 170.5 / 161.3 / 84.8 us against (64, 4, 3)'s 177.5 / 177.6 / 93.2 and
# (64, 4, 7)'s 177.2 / 162.9 / 88.7; the default loop's (32, 4, 5) (two buffers) 240.6 / 279.1 / 171.4 against
# (64, 8, 2)'s 259.7 / 280.2 / 145.5 over bf16: no better everywhere, not taken.
LAUNCH: dict[str, tuple[int, int, int]] = {
    "default": (64, 8, 2),
    "swap_ab": (64, 4, 2),
    "swap_ab_wide": (64, 4, 5),  # WIDE's layout assumes 4 warps; 5 stages: K and V double-buffered
    "fp8_dot": (64, 4, 3),
}
# Key tiles the swap-AB loops prefetch into L2 with the prologue's first loads (GPU only: inline PTX; whole-page
# tiles). Seventeenth session, H200 sweep with the fused RoPE op, FP8 cache, 1,000 x 129-256: 176.7 us with it,
# 180.5 without, 185.5 before the prologue's loads were hoisted. The default loop takes none: its 8-warp launch
# went from 64 to 80 registers with it (3 programs an SM instead of 4) and ran 241.3 against 234.3 us under ncu.
PREFETCH_TILES = 2
# (cache kind, the loop asked for, why it did not run) -> launches that ran the default loop instead.
SKIPPED: dict[tuple[str, str, str], int] = {}
_LOGGED: set[tuple[str, DecodeLoop, bool]] = set()


class DecodeLoop(NamedTuple):
    """The decode kernel's key loop and launch for one call."""

    swap_ab: bool
    fp8_dot: bool
    block_n: int
    num_warps: int
    num_stages: int
    wide: bool = False
    prefetch_tiles: int = 0


def choose_decode_loop(
    kv_fp8: bool, head_dim: int, swap_ab: bool | None = None, fp8_dot: bool | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    wide: bool | None = None,
) -> DecodeLoop:  # fmt: skip
    """The decode launch's loop and (BLOCK_N, warps, stages): the caller's flags and knobs where given, else the rule.

    `wide` asks for the swap-AB loop's WIDE form: it implies swap_ab; FP8_DOT has none (ignored there)."""
    kind = "fp8" if kv_fp8 else "other"
    explicit = swap_ab is not None or fp8_dot is not None or wide is not None
    if explicit:
        if fp8_dot:
            name = "fp8_dot"
        elif wide:
            name = "swap_ab_wide"
        else:
            name = "swap_ab" if swap_ab else "default"
        flags = (bool(swap_ab or (wide and not fp8_dot)), bool(fp8_dot), bool(wide and not fp8_dot))
    else:
        name = DECODE_LOOPS[kind]
        flags = LOOPS[name]
    bn, warps, stages = LAUNCH[name] if not (explicit and fp8_dot and not swap_ab) else LAUNCH["default"]
    launch = (block_n or bn, num_warps or warps, num_stages or stages)
    if not explicit and name != "default":
        reason = None
        if launch[0] < 64:
            reason = f"BLOCK_N {launch[0]} < 64 (wgmma's M)"
        elif flags[1] and not kv_fp8:
            reason = "no FP8 cache"
        elif flags[1] and head_dim < 32:
            reason = f"head dim {head_dim} < 32 (the e4m3 dot's K)"
        if reason is not None:
            key = (kind, name, reason)
            SKIPPED[key] = SKIPPED.get(key, 0) + 1
            if SKIPPED[key] == 1:
                logger.warning("decode attention over a %s cache: the %s key loop does not apply (%s); "
                               "running the default loop (counted in SKIPPED)", *key)  # fmt: skip
            flags = LOOPS["default"]
            d_bn, d_warps, d_stages = LAUNCH["default"]
            launch = (block_n or d_bn, num_warps or d_warps, num_stages or d_stages)
    loop = DecodeLoop(
        flags[0], flags[1], *launch, wide=flags[2], prefetch_tiles=PREFETCH_TILES if flags[0] else 0
    )
    if (kind, loop, explicit) not in _LOGGED:
        _LOGGED.add((kind, loop, explicit))
        logger.info("decode attention over a %s cache: %s (%s)", kind, loop,
                    "the caller's flags" if explicit else "the DECODE_LOOPS rule")  # fmt: skip
    return loop
