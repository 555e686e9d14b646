"""The prefill attention kernel compiled for sm_90a on a machine without a GPU: registers, spills, key-loop SASS.

`_prefill_kernel` as paged_attention.py launches it in an engine's prefill step (Llama-3.1-8B heads: 32 query /
8 KV heads of 128, bf16 cache in pages of 16, whole-page tiles, q already rotated, decode rows skipped), at
each launch asked for; beside it, with `--probe`, benchmarks/gpu_attention_upper.py's paged probe kernel at the
same tiles, the one that ran 0.365 ms at 4 x 2,048 on an H200 against the kernel's 0.47 (RESULTS.md, twentieth
session). Per compile: ptxas registers and spill bytes, shared memory, and the key loop's SASS length with its
local loads and stores (LDL / STL: spilled values reloaded every key tile). Triton's wheel brings ptxas and
nvdisasm; nothing here needs a device.

    PYTHONPATH=. python3 benchmarks/prefill_sm90.py [--launches 32x4x3,64x4x3] [--probe] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("fxllm.gpu.prefill_sm90")

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
_POINTERS = {"q_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "bt_ptr": "*i32", "lens_ptr": "*i32",
             "qsl_ptr": "*i32", "sink_ptr": "*fp32", "out_ptr": "*bf16", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
             "cos_ptr": "*bf16", "sin_ptr": "*bf16"}  # fmt: skip
# The cache's strides in elements ([blocks, 16, 8, 128]): values where the kernel takes them as constexprs.
_CACHE_STRIDES = {"b": PAGE * HKV * HEAD_DIM, "s": HKV * HEAD_DIM, "h": HEAD_DIM}
# Runtime integers that are multiples of 16 in the real launch (Triton specialises them: aligned, vector loads).
_ALIGNED = {"skc_b", "skc_s", "skc_h", "svc_b", "svc_s", "svc_h", "sq_t", "sq_h", "sbt", "so_t", "so_h",
            "bt_stride", "seq_len"}  # fmt: skip


def _compile(fn: Any, consts: dict[str, Any], pointer_type: Any, warps: int, stages: int) -> Any:
    from decode_sm90 import compile_for_sm90

    return compile_for_sm90(fn, consts, pointer_type, _ALIGNED, {"num_warps": warps, "num_stages": stages})


def compile_prefill(block_n: int, warps: int, stages: int, block_q: int = 32, kv: str = "bf16") -> Any:
    """fxllm's `_prefill_kernel` at BLOCK_Q tokens x 4 heads of rows and BLOCK_N keys a tile, over a bf16 or an
    FP8 (e4m3) cache."""
    from fxllm.backends.triton.paged_attention_prefill import _prefill_kernel

    consts: dict[str, Any] = dict(
        HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM, GROUP_P=HQ // HKV, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_D=HEAD_DIM, BLOCK_DV=HEAD_DIM, USE_SOFTCAP=False, USE_WINDOW=False, HAS_SINKS=False, F32_DOT=False,
        KV_FP8=kv == "fp8", ROPE=False, SKIP_SINGLE=True, PAGE_ROWS=PAGE,
    )  # fmt: skip
    for param in _prefill_kernel.params:
        if param.is_constexpr and param.name[:4] in ("skc_", "svc_"):
            consts[param.name] = _CACHE_STRIDES[param.name[-1]]
    cache = "*fp8e4nv" if kv == "fp8" else "*bf16"
    return _compile(_prefill_kernel, consts, lambda name: cache if name in ("kc_ptr", "vc_ptr") else _POINTERS[name],
                    warps, stages)  # fmt: skip


def compile_probe(block_n: int, warps: int, stages: int, block_q: int = 32) -> Any:
    """gpu_attention_upper.py's probe kernel, paged loads and packed rows, at the same tiles."""
    from gpu_attention_upper import _dense_causal_fwd

    consts = dict(HQ=HQ, HKV=HKV, D=HEAD_DIM, BLOCK_Q=block_q, BLOCK_N=block_n, ROWS=block_q * (HQ // HKV),
                  TMA=False, PACK=True, PAGED=True)  # fmt: skip
    return _compile(
        _dense_causal_fwd, consts, lambda name: "*i32" if name == "bt_ptr" else "*bf16", warps, stages
    )


def report(kernel: Any) -> dict[str, Any]:
    """Registers, spills, shared memory and the key loop's SASS counts of one compile."""
    from decode_sass import loop_counts
    from decode_sm90 import ptxas_usage

    counts = loop_counts(kernel.asm["cubin"], top=40)
    ops = counts.get("sass_loop_ops", {})
    return {
        **ptxas_usage(kernel.asm["ptx"]),
        "shared_bytes": kernel.metadata.shared,
        "sass_total": counts.get("sass_total"),
        "sass_loop": counts.get("sass_loop"),
        "loop_local_loads": ops.get("LDL", 0),
        "loop_local_stores": ops.get("STL", 0),
        "loop_tensor_ops": ops.get("HGMMA", 0),
    }


def main() -> int:
    """Compile each launch (BLOCK_N x warps x stages), print and write prefill_sm90.json under --out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", default="32x4x3,64x4x3,64x8x3,128x8x3")
    parser.add_argument("--probe", action="store_true", help="also compile the probe kernel at each launch")
    parser.add_argument("--kv", choices=("bf16", "fp8"), default="bf16", help="fxllm's kernel's cache dtype")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for launch in args.launches.split(","):
        block_n, warps, stages = (int(x) for x in launch.split("x"))
        kernels = {f"fxllm {args.kv}": lambda bn, w, st: compile_prefill(bn, w, st, kv=args.kv)}
        if args.probe:
            kernels["probe"] = compile_probe
        for name, build in kernels.items():
            row = {"kernel": name, "block_q": 32, "block_n": block_n, "warps": warps, "stages": stages,
                   **report(build(block_n, warps, stages))}  # fmt: skip
            logger.info("%s", row)
            rows.append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "prefill_sm90.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
