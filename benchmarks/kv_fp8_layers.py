"""Which layers an FP8 KV cache hurts: Hugging Face SmolLM2 with its keys (after RoPE) and values fake-quantized
to e4m3 exactly as the cache stores them (fxllm/ops/kv_quant.py), per layer, on eval-ppl's windows.

Usage (repo root, CPU): PYTHONPATH=. python benchmarks/kv_fp8_layers.py [--max-tokens 2048] [--dtype float32]
Prints, per layer, the K/V absolute maxima, the relative quantization error of K and V, and the perplexity
with only that layer's cache in FP8; then all layers in FP8 with scale 1.0, with per-layer calibrated
scales (amax / 448 from the same text), and with the worst layers excluded.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fxllm.models import load_model
from fxllm.ops.kv_quant import FP8_MAX, dequantize_kv, quantize_kv
from fxllm.serve.eval_ppl import default_text, sliding_windows

STATE: dict = {"quant": set(), "scales": {}, "stats": None}


def _fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [B, Hkv, T, D] -> the cache's layout [..., Hkv, D] and back
    t = x.transpose(1, 2)
    return dequantize_kv(quantize_kv(t, scale), scale, x.dtype).transpose(1, 2)


def fq_attention(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
    layer = module.layer_idx
    stats = STATE["stats"]
    if stats is not None:
        s = stats.setdefault(layer, {"k_amax": 0.0, "v_amax": 0.0, "k_err": [], "v_err": []})
        s["k_amax"] = max(s["k_amax"], float(key.abs().max()))
        s["v_amax"] = max(s["v_amax"], float(value.abs().max()))
        one = torch.tensor([1.0])
        for name, x in (("k", key), ("v", value)):
            q = _fake_quant(x.float(), one)
            s[f"{name}_err"].append(float((q - x.float()).norm() / x.float().norm()))
    if layer in STATE["quant"]:
        k_scale, v_scale = STATE["scales"].get(layer, (torch.tensor([1.0]), torch.tensor([1.0])))
        key, value = _fake_quant(key, k_scale), _fake_quant(value, v_scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def ppl(model, ids: list[int], windows) -> float:  # type: ignore[no-untyped-def]
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows:
            logits = model(torch.tensor([ids[begin:end]])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            nll -= sum(float(lp[p - begin - 1, ids[p]]) for p in range(first, end))
            count += end - first
    return math.exp(nll / count)


def main() -> int:
    """Per-layer FP8 KV sensitivity table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--exclude", type=int, default=3, help="exclude this many worst layers at the end")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    AttentionInterface.register("fxllm_fp8_fake", fq_attention)
    loaded = load_model("smollm2", dtype=getattr(torch, args.dtype))
    model = loaded.model.eval()
    model.config._attn_implementation = "fxllm_fp8_fake"
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = "fxllm_fp8_fake"
    ids = list(loaded.tokenizer(default_text()).input_ids)[: args.max_tokens]
    windows = sliding_windows(len(ids), 1024, 512)
    num_layers = model.config.num_hidden_layers
    STATE["stats"] = {}
    base = ppl(model, ids, windows)
    stats, STATE["stats"] = STATE["stats"], None
    out = {"tokens": len(ids), "dtype": args.dtype, "base": base, "layers": {}}
    print(f"{args.dtype}, {len(ids)} tokens, {len(windows)} windows: perplexity {base:.4f} (no FP8)")
    print(f"{'layer':>5} {'K amax':>8} {'V amax':>8} {'K err':>7} {'V err':>7} {'ppl (this layer FP8)':>21}")
    for layer in range(num_layers):
        STATE["quant"] = {layer}
        value = ppl(model, ids, windows)
        s = stats[layer]
        row = {"k_amax": s["k_amax"], "v_amax": s["v_amax"], "k_err": max(s["k_err"]), "v_err": max(s["v_err"]),
               "ppl": value, "ratio": value / base}  # fmt: skip
        out["layers"][layer] = row
        print(f"{layer:>5} {row['k_amax']:>8.1f} {row['v_amax']:>8.2f} {row['k_err']:>7.4f} {row['v_err']:>7.4f} "
              f"{value:>12.4f} ({value / base:.4f}x)")  # fmt: skip
    STATE["quant"] = set(range(num_layers))
    out["all_fp8"] = ppl(model, ids, windows)
    STATE["scales"] = {i: (torch.tensor([max(stats[i]["k_amax"] / FP8_MAX, 1e-6)]),
                           torch.tensor([max(stats[i]["v_amax"] / FP8_MAX, 1e-6)])) for i in range(num_layers)}  # fmt: skip
    out["all_fp8_calibrated"] = ppl(model, ids, windows)
    STATE["scales"] = {}
    worst = sorted(range(num_layers), key=lambda i: -out["layers"][i]["ratio"])[: args.exclude]
    STATE["quant"] = set(range(num_layers)) - set(worst)
    out["exclude"] = worst
    out["all_fp8_but_worst"] = ppl(model, ids, windows)
    print(f"all layers FP8, scale 1.0: {out['all_fp8']:.4f} ({out['all_fp8'] / base:.4f}x)")
    print(f"all layers FP8, calibrated scales (amax/448): {out['all_fp8_calibrated']:.4f} "
          f"({out['all_fp8_calibrated'] / base:.4f}x)")  # fmt: skip
    rest = out["all_fp8_but_worst"]
    print(f"all but layers {worst} FP8: {rest:.4f} ({rest / base:.4f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
