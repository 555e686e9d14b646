"""The machine code (SASS) of a compiled Triton kernel's key loop, without a GPU: instructions per iteration.

Triton's wheel bundles `nvdisasm`; a kernel compiled for sm_90a (benchmarks/decode_sm90.py's
`compile_sm90`) carries its cubin. The key loop is the backward branch whose body holds the most
tensor-core instructions (HGMMA, QGMMA for FP8, HMMA); its length is what one warp issues per key tile. In the
sixteenth session whole-page tiles and row sums after the loop took the FP8 loop from 628 to 480, measured
216.5 -> 183.0 us on an H200 (64 x 4 warps x 2 stages, benchmarks/RESULTS.md). It says nothing of registers
(occupancy) or of the code around the loop: a change that left the loop alone and grew the epilogue measured
slower. Used by fp8_decode_ptx.py.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_TENSOR = re.compile(r"\b(?:HGMMA|QGMMA|IGMMA|HMMA|IMMA)\b")  # QGMMA: the FP8 wgmma
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def nvdisasm() -> str | None:
    """Triton's bundled nvdisasm, else one on PATH, else None."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """nvdisasm -c text -> (instructions in order, label -> index of the instruction after it)."""
    insns: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(insns)
        elif m := _INSN.search(line):
            insns.append(m.group(1))
    return insns, labels


def densest_loop(
    lines: list[str], labels: dict[str, int], branch: re.Pattern[str], marker: re.Pattern[str], what: str
) -> slice:
    """The body of the backward branch whose lines hold the most `marker` matches (the shortest where several tie).

    `lines`: instructions (SASS) or text lines (PTX); `labels`: label -> index of its body's first line;
    `branch`: a branch instruction, its target label as group 1. Raises ValueError ("no loop with `what`") where
    no loop has a match."""
    best: tuple[int, int, int, int] | None = None  # (matches, -length, start, end)
    for end, text in enumerate(lines):
        m = branch.search(text)
        start = labels.get(m.group(1)) if m else None
        if start is None or start > end:  # not a backward branch
            continue
        cand = (sum(len(marker.findall(t)) for t in lines[start : end + 1]), start - end, start, end)
        if best is None or cand > best:
            best = cand
    if best is None or best[0] == 0:
        raise ValueError(f"no loop with {what}")
    return slice(best[2], best[3] + 1)


def key_loop(sass: str) -> list[str]:
    """The loop body with the most tensor-core instructions (the shortest such loop where several tie)."""
    insns, labels = instructions(sass)
    return insns[densest_loop(insns, labels, _BRANCH, _TENSOR, "tensor-core instructions in this SASS")]


def opcode(insn: str) -> str:
    """'@!P0 LDG.E.128 R4, [R2.64]' -> 'LDG'."""
    return _PREDICATE.sub("", insn).split()[0].split(".")[0]


def loop_counts(cubin: bytes, top: int = 12) -> dict[str, Any]:
    """SASS instructions of the whole kernel and of its key loop, with the loop's most frequent opcodes."""
    tool = nvdisasm()
    if tool is None:
        return {"sass_error": "no nvdisasm (Triton's wheel bundles one)"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout
    body = key_loop(sass)
    ops = collections.Counter(opcode(t) for t in body)
    return {
        "sass_total": len(instructions(sass)[0]),
        "sass_loop": len(body),
        "sass_loop_ops": dict(ops.most_common(top)),
    }
