"""Which key loop the decode kernel runs (issue 15): the default, SWAP_AB, or FP8_DOT (+ SWAP_AB); host code.

The rule, per launch: flags the caller passes win (benchmarks, tests, the `triton_swap_ab` / `triton_fp8_dot`
op backends that compile.op_backends can name). Otherwise `DECODE_LOOPS` picks by the cache's kind, and a
loop runs only where it compiles to what it is for on an H100/H200 (benchmarks/gpu_decode_sweep.py --sm90):
SWAP_AB needs BLOCK_N >= 64 (wgmma's M is 64: below it Triton emits mma.sync and the swap gains nothing);
FP8_DOT needs an FP8 cache, SWAP_AB's conditions (without the swap the 16-row e4m3 dot is upcast to f16
mma.sync: the default loop plus quantization error) and head dim and BLOCK_N >= 32 (the e4m3 dot's K). A
table choice that the shape rules out runs the default loop, logged with a count in SKIPPED. Every distinct
choice is logged once at INFO. Both kinds run the default loop until a GPU sweep shows a variant is faster.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Cache kind -> (swap_ab, fp8_dot). "fp8": float8_e4m3fn caches; "other": bf16 / fp16 / fp32 caches.
DECODE_LOOPS: dict[str, tuple[bool, bool]] = {"fp8": (False, False), "other": (False, False)}
# (cache kind, the loop asked for, why it did not run) -> launches that ran the default loop instead.
SKIPPED: dict[tuple[str, str, str], int] = {}
_LOGGED: set[tuple[str, bool, bool, bool]] = set()


def _name(swap_ab: bool, fp8_dot: bool) -> str:
    return (
        "fp8_dot+swap_ab"
        if fp8_dot and swap_ab
        else "fp8_dot"
        if fp8_dot
        else "swap_ab"
        if swap_ab
        else "default"
    )


def choose_decode_loop(
    kv_fp8: bool, head_dim: int, block_n: int, swap_ab: bool | None = None, fp8_dot: bool | None = None
) -> tuple[bool, bool]:
    """(swap_ab, fp8_dot) for one decode launch: the caller's flags where given, else the documented rule."""
    kind = "fp8" if kv_fp8 else "other"
    explicit = swap_ab is not None or fp8_dot is not None
    if explicit:
        chosen = (bool(swap_ab), bool(fp8_dot))
    else:
        want_swap, want_fp8 = DECODE_LOOPS[kind]
        reason = None
        if (want_swap or want_fp8) and block_n < 64:
            reason = f"BLOCK_N {block_n} < 64 (wgmma's M)"
        elif want_fp8 and not kv_fp8:
            reason = "no FP8 cache"
        elif want_fp8 and head_dim < 32:
            reason = f"head dim {head_dim} < 32 (the e4m3 dot's K)"
        if reason is not None:
            key = (kind, _name(want_swap, want_fp8), reason)
            SKIPPED[key] = SKIPPED.get(key, 0) + 1
            if SKIPPED[key] == 1:
                logger.warning("decode attention over a %s cache: the %s key loop does not apply (%s); "
                               "running the default loop (counted in SKIPPED)", *key)  # fmt: skip
            chosen = (False, False)
        else:
            chosen = (want_swap or want_fp8, want_fp8)  # FP8 dots only with the swap (see the docstring)
    log_key = (kind, *chosen, explicit)
    if log_key not in _LOGGED:
        _LOGGED.add(log_key)
        logger.info("decode attention over a %s cache: %s key loop (%s)", kind, _name(*chosen),
                    "the caller's flags" if explicit else "DECODE_LOOPS rule")  # fmt: skip
    return chosen
