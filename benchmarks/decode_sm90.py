"""The decode kernel compiled for sm_90a on a machine without a GPU (issue 15): what each sweep launch becomes.

`compile_sm90` builds `_decode_kernel` as benchmarks/gpu_decode_sweep.py launches it (Llama-3.1-8B heads, block
16, WRITE_KV) with Triton's bundled ptxas; `ptxas_usage` reads registers and spills; `sm90_report` (the sweep's
`--sm90`) compiles every variant x launch and says what its dots became. benchmarks/fp8_decode_ptx.py counts the
key loop's PTX and SASS of the same compiles.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from benchmarks.gpu_decode_sweep import _DOT_RE, HEAD_DIM, _short
from fxllm.backends.triton import paged_attention as tpa
from fxllm.backends.triton.paged_attention_decode_choice import PREFETCH_TILES

logger = logging.getLogger("fxllm.gpu.decode_sm90")

_PTR_TYPES = {"q_ptr": "bf16", "bt_ptr": "i32", "lens_ptr": "i32", "qsl_ptr": "i32", "part_ptr": "fp32",
              "lse_ptr": "fp32", "ks_ptr": "fp32", "vs_ptr": "fp32", "cos_ptr": "bf16", "sin_ptr": "bf16",
              "k_ptr": "bf16", "v_ptr": "bf16", "slot_ptr": "i64", "out_ptr": "bf16", "sink_ptr": "fp32"}  # fmt: skip
# Arguments that are multiples of 16 in the real launch (Triton specialises them: aligned, vectorised loads).
_ALIGNED = (
    "skc_b",
    "skc_s",
    "skc_h",
    "svc_b",
    "svc_s",
    "svc_h",
    "sq_t",
    "sq_h",
    "sk_t",
    "sv_t",
    "sbt",
    "so_t",
    "so_h",
)


def compile_for_sm90(
    fn: Any, consts: dict[str, Any], pointer_type: Callable[[str], str], aligned: Collection[str],
    options: dict[str, int],
) -> Any:  # fmt: skip
    """Any Triton kernel compiled for sm_90a without a GPU: `consts` become constexprs, pointers take
    `pointer_type(name)`, pointers and the `aligned` integers are marked multiples of 16 (as a real launch
    specialises them), the other scalars are i32 (fp32 for qk_scale / softcap). benchmarks/prefill_sm90.py uses it
    too."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith(("_ptr", "_desc")):
            signature[name] = pointer_type(name)
        else:
            signature[name] = "fp32" if name in ("qk_scale", "softcap") else "i32"
        if name.endswith("_ptr") or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options
    )


def compile_sm90(kv: str, launch: dict[str, int], flags: dict[str, bool | int], rope: bool = False) -> Any:
    """The decode kernel as the sweep launches it (8B heads, WRITE_KV, one split: DIRECT where the launch code
    uses it; with `rope` the fused RoPE op's launch, as an engine runs it), compiled for sm_90a without a GPU."""
    fp8 = kv == "fp8"
    consts: dict[str, Any] = dict(
        HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM, BLOCK_H=16, BLOCK_N=launch.get("block_n", 64), BLOCK_D=HEAD_DIM,
        BLOCK_DV=HEAD_DIM, USE_SOFTCAP=False, USE_WINDOW=False, F32_DOT=False, KV_FP8=fp8, ROPE=rope,
        WRITE_KV=True, USE_PDL=False, FP8_F16=fp8 and not flags.get("fp8_dot", False), MIXED=False,
        SWAP_AB=flags.get("swap_ab", False), FP8_DOT=flags.get("fp8_dot", False), WIDE=flags.get("wide", False),
        DIRECT=flags.get("direct", True) and flags.get("swap_ab", False), HAS_SINKS=False,
        PAGE_ROWS=16, PREFETCH_TILES=int(flags.get("prefetch_tiles", PREFETCH_TILES if flags.get("swap_ab") else 0)),
        # A contiguous cos/sin table's dim stride is 1, which a real launch specialises; left a runtime value,
        # ROPE's loads do not compile (Triton 3.6: "Illegal shared layout" in TritonGPUOptimizeDotOperands).
        sc_d=1, ss_d=1,
    )  # fmt: skip
    cache = "*fp8e4nv" if fp8 else "*bf16"
    options = {"num_warps": launch.get("num_warps", 4), "num_stages": launch.get("num_stages", 3)}
    if launch.get("max_registers"):
        options["maxnreg"] = launch["max_registers"]
    return compile_for_sm90(
        tpa._decode_kernel, consts, lambda name: cache if name in ("kc_ptr", "vc_ptr") else "*" + _PTR_TYPES[name],
        _ALIGNED, options,
    )  # fmt: skip


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers and spill bytes that Triton's bundled ptxas reports for sm_90a."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"regs": int(regs.group(1)) if regs else -1, "spill_bytes": int(spills.group(1)) if spills else -1}


def tile_buffers(ttgir: str) -> list[int]:
    """How many shared-memory buffers each pipelined 2-D tile gets (K and V; the block-table pages are 1-D).

    Triton's pipeliner spends `num_stages` on the chain block table -> K/V first: on sm_90a the decode launches
    with 2-4 stages give K and V one buffer each (the next tile is copied in only after the current one reached
    registers), 5-6 stages two, 7 three (8B heads, seventeenth session)."""
    return [int(n) for n in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]


def sm90_report(
    variants: dict[str, tuple[dict[str, bool | int], tuple[str, ...], float]],
    launches: dict[str, list[dict[str, int]]],
    rope: bool = False,
) -> list[dict[str, Any]]:
    """Every variant x launch (the sweep's tables, as filtered there) compiled for sm_90a: what its dots became."""
    rows = []
    for kv in ("bf16", "fp8"):
        for variant, (flags, dtypes, _) in variants.items():
            if kv not in dtypes:
                continue
            for launch in launches[variant]:
                row: dict[str, Any] = {"kv": kv, "variant": variant, **launch}
                try:
                    ck = compile_sm90(kv, launch, flags, rope)
                except Exception as exc:  # a launch the compiler rejects: the GPU sweep would record it too
                    rows.append({**row, "error": f"{type(exc).__name__}: {_short(exc)}"})
                    continue
                ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
                # Per wgmma: where its A operand comes from (shared memory or registers).
                a_from = ["smem" if m == "!ttg.memdesc" else "regs"
                          for m in re.findall(r"ttng\.warp_group_dot [^{]*\{[^}]*\} : (!ttg\.memdesc|tensor)", ttgir)]  # fmt: skip
                row.update(dots=sorted(set(_DOT_RE.findall(ptx))), wgmma_a=a_from,
                           mma_v2=len(re.findall(r"= tt\.dot ", ttgir)), shared_bytes=ck.metadata.shared,
                           async_copies=ttgir.count("ttg.async_copy_global_to_local"),
                           tile_buffers=tile_buffers(ttgir),
                           **ptxas_usage(ptx))  # fmt: skip
                rows.append(row)
                logger.info("sm90 %s", row)
    return rows
