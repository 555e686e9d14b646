"""FP8 checkpoints on the GPU: Llama-3.1-8B's shapes (random weights, --num-layers of them) written as a
ModelOpt FP8 folder (per-tensor weight and static input scales, k/v scales) and a compressed-tensors
FP8_DYNAMIC folder (channel scales, dynamic per-token activations), each in its exact layout, then served
with `LLM(path)` and no flag in bfloat16. Per layout: the FP8 GEMM implementations the lowering chose,
the resident e4m3 weight bytes, greedy tokens vs the eager FP8 model (the same arithmetic through the
op's reference; FP8 tensor cores sum in another order, so near-ties may flip: the agreement is reported,
not asserted), and batch-1 decode tok/s (128 tokens, CUDA graphs on).

    python benchmarks/gpu_fp8_checkpoint.py --out DIR            # H100: ~4-6 min (4 layers, 3 starts)
    python benchmarks/gpu_fp8_checkpoint.py --out DIR --smoke    # CPU: tiny-llama, checks the script
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.quantization.fp8 import FP8_DTYPE, FP8_MAX, quantize_weight
from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger("gpu_fp8_checkpoint")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
    "config_groups": {"group_0": {
        "format": "float-quantized", "targets": ["Linear"], "output_activations": None,
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
    }},
}  # fmt: skip


def write_checkpoint(model: torch.nn.Module, folder: Path, layout: str) -> None:
    """`model`'s weights as an FP8 folder in `layout` ("modelopt" or "compressed-tensors")."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if not (module.endswith(LINEARS) and name.endswith(".weight")):
            tensors[name] = tensor.detach().contiguous().cpu()
            continue
        if layout == "modelopt":
            q, scale = quantize_weight(tensor, "tensor")
            tensors[f"{module}.weight_scale"] = scale.reshape(()).cpu()
            tensors[f"{module}.input_scale"] = torch.tensor(
                8.0 / FP8_MAX
            )  # |x| <= 8: a plausible calibration
        else:
            q, scale = quantize_weight(tensor, "channel")
            tensors[f"{module}.weight_scale"] = scale.cpu()
        tensors[name] = q.cpu()
    if "lm_head.weight" in tensors and model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    model.config.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    if layout == "modelopt":
        for layer in range(model.config.num_hidden_layers):
            tensors[f"model.layers.{layer}.self_attn.k_proj.k_scale"] = torch.tensor(1.0)
            tensors[f"model.layers.{layer}.self_attn.v_proj.v_scale"] = torch.tensor(1.0)
        quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
        (folder / "hf_quant_config.json").write_text(
            json.dumps({"producer": {"name": "modelopt"}, "quantization": quant})
        )
    else:
        config["quantization_config"] = CT_CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def measure(
    folder: Path, layout: str, device: str, smoke: bool, prompts: list[list[int]], fp8_kv: bool
) -> dict[str, Any]:
    """Serve `folder` with no flag; implementations, e4m3 bytes, tokens vs eager, decode tok/s."""
    overrides = [
        f"model.device={device}",
        "cache.num_blocks=64" if smoke else "cache.gpu_memory_fraction=0.5",
    ]
    overrides += ["cache.dtype=fp8"] if fp8_kv else []  # the checkpoint's k/v scales
    if smoke:
        overrides.append("compile.backend=eager")
    start = time.perf_counter()
    llm = LLM(str(folder), config=load_config(None, overrides))
    row: dict[str, Any] = {
        "layout": layout + (" + fp8 KV" if fp8_kv else ""),
        "start_s": time.perf_counter() - start,
    }
    gm = llm.engine.runner.graph_module
    row["fp8_weights"] = sum(p.dtype == FP8_DTYPE for p in gm.parameters())
    row["fp8_weight_gb"] = sum(p.numel() for p in gm.parameters() if p.dtype == FP8_DTYPE) / 1e9
    row["implementations"] = {op: b for op, b in llm.build_info.op_backends.items() if "fp8" in op}
    new = 16
    params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0)
    served = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    eager = load_model(str(folder), device=device, dtype=torch.float32 if smoke else torch.bfloat16).model
    with torch.no_grad():
        expected = [
            eager.generate(torch.tensor([p], device=device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)[0, len(p):].tolist()
            for p in prompts
        ]  # fmt: skip
    del eager
    same = sum(a == b for s, e in zip(served, expected) for a, b in zip(s, e))
    row["tokens_equal_eager"] = f"{same}/{new * len(prompts)}"
    decode = 16 if smoke else 128
    params = SamplingParams(max_tokens=decode, min_tokens=decode, temperature=0)
    llm.generate(prompts[:1], params)  # warm
    t0 = time.perf_counter()
    llm.generate(prompts[:1], params)
    row["decode_tok_s_batch1"] = decode / (time.perf_counter() - t0)
    return row


def main() -> int:
    """Write both layouts, serve each, write gpu_fp8_checkpoint.json under --out and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny-llama")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    device = "cpu" if args.smoke else "cuda"
    out_file = Path(args.out) / "gpu_fp8_checkpoint.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
                               "torch": torch.__version__, "smoke": args.smoke, "rows": []}  # fmt: skip
    os.environ.setdefault("FXLLM_NO_COMPILE_CACHE", "1")  # verify_weights cannot compare float8 yet
    preset = "tiny-llama" if args.smoke else "llama-3.1-8b"
    gen = torch.Generator().manual_seed(0)
    vocab = 512 if args.smoke else 128256
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 33, 120)]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(preset, device=device, dtype=torch.float32 if args.smoke else torch.bfloat16,
                           num_layers=None if args.smoke else args.num_layers).model  # fmt: skip
        for layout in ("modelopt", "compressed-tensors"):
            write_checkpoint(model, Path(tmp) / layout, layout)
        del model
        # The FP8 KV row's tokens differ from the eager model's (its cache is bf16): for its decode speed.
        for layout, fp8_kv in (("modelopt", False), ("modelopt", True), ("compressed-tensors", False)):
            try:
                results["rows"].append(
                    measure(Path(tmp) / layout, layout, device, args.smoke, prompts, fp8_kv)
                )
            except Exception as exc:  # keep the other layout's numbers
                logger.exception("layout %s failed", layout)
                results[f"{layout}_error"] = f"{type(exc).__name__}: {exc}"
            out_file.write_text(json.dumps(results, indent=1))
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"{'layout':<30}{'fp8 GEMM impl':<28}{'e4m3 GB':>9}{'tokens = eager':>16}{'decode tok/s':>14}")
    for row in results["rows"]:
        impl = ",".join(f"{k}:{v}" for k, v in row["implementations"].items())
        print(f"{row['layout']:<30}{impl:<28}{row['fp8_weight_gb']:>9.2f}{row['tokens_equal_eager']:>16}"
              f"{row['decode_tok_s_batch1']:>14.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
