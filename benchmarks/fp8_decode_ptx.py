"""How the decode kernel's key loop moves its K/V tiles, per variant, read from sm_90a PTX without a GPU (issue 15).

Compiles `_decode_kernel` as benchmarks/gpu_decode_sweep.py launches it (Llama-3.1-8B heads: head dim 128,
16 padded query rows, WRITE_KV) for sm_90a with Triton's bundled ptxas, finds the key loop in the PTX (the
backward branch whose body holds the most wgmma / mma.sync instructions) and counts, in that body, i.e. per
key tile and thread: cp.async by size, global loads, shared loads and stores by width, ldmatrix, packed e4m3x2
-> f16x2 conversions, byte permutes and the dot instructions; ptxas's registers and the shared memory; and from
the cubin (benchmarks/decode_sass.py) the SASS instructions one warp issues per key tile, by opcode.
Over an FP8 cache the swap-AB loop read its tiles back from shared memory one or two bytes at a time
(ld.shared.b8 / .b16); the WIDE loop ("swap_ab_wide") is meant to read them 4-16 bytes at a time.

Usage (CPU is enough, ~5 s per variant): PYTHONPATH=. python benchmarks/fp8_decode_ptx.py [--launch 64,4,2 ...]
Without --launch each variant compiles with its own launch (paged_attention_decode_choice.LAUNCH).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks import decode_sass

logger = logging.getLogger("fxllm.bench.fp8_decode_ptx")

# (cache dtype, sweep variant name): the bf16 rows show what the same loops look like over a bf16 cache.
ROWS: list[tuple[str, str]] = [
    ("bf16", "default"),
    ("bf16", "swap_ab"),
    ("fp8", "default"),
    ("fp8", "swap_ab"),
    ("fp8", "swap_ab_wide"),
    ("fp8", "fp8_dot+swap_ab"),
]
# Instructions counted in the loop body, by a short column name.
COUNTED: dict[str, str] = {
    "cp.async": r"cp\.async\.c[ag]\.shared\.global",
    "ld.global": r"ld\.global(?:\.\w+)*",
    "ld.shared": r"ld\.shared(?:\.\w+)*",
    "st.shared": r"st\.shared(?:\.\w+)*",
    "ldmatrix": r"ldmatrix(?:\.\w+)*",
    "cvt.e4m3x2": r"cvt\.rn\.f16x2\.e4m3x2",
    "prmt": r"prmt\.b32",
    "wgmma": r"wgmma\.mma_async\.sync\.aligned\.\w+",
    "mma.sync": r"mma\.sync\.aligned\.\w+",
}
_PREFIX = {
    "cvt.e4m3x2": "cvt.rn.f16x2.e4m3x2",
    "wgmma": "wgmma.mma_async.sync.aligned",
    "mma.sync": "mma.sync.aligned",
    "ldmatrix": "ldmatrix.sync.aligned",
}
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_DOT = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\b")
_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)")


def key_loop(ptx: str) -> str:
    """The PTX of the loop body with the most dot instructions (the innermost such loop where several tie)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    return "\n".join(
        lines[decode_sass.densest_loop(lines, labels, _BRANCH, _DOT, "dot instructions in this PTX")]
    )


def count(body: str) -> dict[str, dict[str, int]]:
    """Per counted kind: instruction spelling (width / shape suffix) -> occurrences in `body`."""
    out: dict[str, dict[str, int]] = {}
    for kind, pattern in COUNTED.items():
        if kind == "cp.async":  # the copy size is an operand, not a suffix
            found = [f"{int(size, 16)}B" for size in _CP_ASYNC.findall(body)]
        else:  # the spelling after the kind's own prefix: "v4.b32", "m64n16k16", "x4.trans.shared.b16"
            found = [m.removeprefix(_PREFIX.get(kind, kind)).lstrip(".") or kind
                     for m in re.findall(rf"\b{pattern}", body)]  # fmt: skip
        out[kind] = dict(sorted(collections.Counter(found).items()))
    return out


def report(launch: tuple[int, int, int] | None, rope: bool = False) -> list[dict[str, Any]]:
    """Compile every row of ROWS for sm_90a (with `rope`, as the fused RoPE op) and count its key loop."""
    from benchmarks import decode_sm90
    from benchmarks import gpu_decode_sweep as sweep
    from fxllm.backends.triton.paged_attention_decode_choice import LAUNCH

    rows = []
    for kv, variant in ROWS:
        flags = sweep.VARIANTS[variant][0]
        loop_name = variant.replace("fp8_dot+swap_ab", "fp8_dot")
        bn, warps, stages = launch or LAUNCH[loop_name]
        row: dict[str, Any] = {"kv": kv, "variant": variant, "launch": f"{bn}x{warps}w{stages}s"}
        try:
            ck = decode_sm90.compile_sm90(
                kv, {"block_n": bn, "num_warps": warps, "num_stages": stages}, flags, rope
            )
            ptx = ck.asm["ptx"]
            row.update(count(key_loop(ptx)), shared_bytes=ck.metadata.shared, **decode_sm90.ptxas_usage(ptx))
            row.update(decode_sass.loop_counts(ck.asm["cubin"]))
        except Exception as exc:  # a variant that does not compile here: reported, the others still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
        logger.info("%s", row)
        rows.append(row)
    return rows


def _cell(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items()) or "-"


def main() -> int:
    """Print one block per variant (and write JSON with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="append", default=[],
                        help="BLOCK_N,warps,stages for every variant (repeatable); default: each loop's own")  # fmt: skip
    parser.add_argument("--out", default=None, help="directory for fp8_decode_ptx.json")
    parser.add_argument(
        "--rope", action="store_true", help="compile the fused RoPE op's launch (an engine's)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    launches: list[tuple[int, int, int] | None] = [None]
    if args.launch:
        launches = [tuple(int(x) for x in s.split(",")) for s in args.launch]  # type: ignore[misc]
    rows = [row for launch in launches for row in report(launch, args.rope)]
    print("per key tile and thread, in the key loop's PTX body (sm_90a):")
    for r in rows:
        head = f"{r['kv']:>4} {r['variant']:<16} {r['launch']:>8}"
        if "error" in r:
            print(f"{head}  {r['error']}")
            continue
        print(f"{head}  regs {r['regs']} spill {r['spill_bytes']} smem {r['shared_bytes']}")
        for kind in COUNTED:
            print(f"{'':>31}{kind:>11}  {_cell(r[kind])}")
        if "sass_loop" in r:
            print(f"{'':>31}{'SASS':>11}  {r['sass_loop']} per tile and warp ({r['sass_total']} in all): "
                  f"{_cell(r['sass_loop_ops'])}")  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp8_decode_ptx.json").write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
