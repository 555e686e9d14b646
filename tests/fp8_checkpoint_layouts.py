"""Tiny FP8 checkpoints in the public layouts, from tiny-llama's random weights (tests/test_fp8_checkpoints.py):
compressed-tensors written by the package's own compressor, ModelOpt's hf_quant_config.json layout by hand,
and compressed-tensors with 128 x 128 block weight scales."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxllm.models import load_model
from fxllm.quantization.checkpoint import Fp8CheckpointError
from fxllm.quantization.checkpoint_modules import Fp8Linear
from fxllm.quantization.fp8 import (
    FP8_MAX,
    dequantize_weight,
    quantize_activation,
    quantize_activation_tensor,
    quantize_weight,
)

_gen = torch.Generator().manual_seed(11)
PROMPTS = [torch.randint(3, 512, (n,), generator=_gen).tolist() for n in (6, 17)]  # also the calibration set
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def float_model() -> torch.nn.Module:
    """tiny-llama in float32 (the checkpoints' source)."""
    return load_model("tiny-llama", dtype="float32").model


def input_amax(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each linear's largest |input| over the test prompts (calibration for static input scales)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":

            def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                value = args[0].detach().abs().amax().reshape(1)
                amax[name] = torch.maximum(amax.get(name, value), value)

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for prompt in PROMPTS:
            model(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return amax


def ct_scheme(weights: str, activations: str, targets: tuple[str, ...] = ("Linear",)) -> Any:
    """A compressed-tensors FP8 QuantizationScheme: `weights` channel | tensor, `activations` token | tensor
    (dynamic) | static (per-tensor input_scale)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def fp8(strategy: str, dynamic: bool) -> Any:
        return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=dynamic)

    act = fp8("tensor" if activations in ("tensor", "static") else "token", activations != "static")
    return QuantizationScheme(targets=list(targets), weights=fp8(weights, False), input_activations=act)


def write_compressed_tensors(
    folder: Path, preset: str | dict[str, Any], ignore: tuple[str, ...] = ("lm_head",)
) -> Path:
    """tiny-llama saved by compressed-tensors' own compressor: a preset (FP8_DYNAMIC: channel; FP8: tensor,
    static) or config groups {name: QuantizationScheme} (first match wins, as the package applies them)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    model = float_model()
    amax = input_amax(model)
    groups = {"group_0": preset_name_to_scheme(preset, ["Linear"])} if isinstance(preset, str) else preset
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=list(ignore)))
    for name, module in model.named_modules():
        if hasattr(module, "weight_scale"):  # what llm-compressor's min-max observer computes: amax / 448
            _, scale = quantize_weight(
                module.weight, "channel" if module.weight_scale.numel() > 1 else "tensor"
            )
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "input_scale"):
                module.input_scale.data.copy_((amax[name] / FP8_MAX).reshape(module.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(folder))
    compressor.update_config(str(folder))
    return folder


def write_modelopt(folder: Path) -> Path:
    """tiny-llama in ModelOpt's FP8 layout (hf_quant_config.json, scalar scales, k_proj.k_scale / v_proj.v_scale)."""
    model = float_model()
    amax = input_amax(model)
    model.save_pretrained(str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module.endswith(LINEARS) and name.endswith(".weight"):
            q, scale = quantize_weight(tensor, "tensor")
            tensors[name] = q
            tensors[f"{module}.weight_scale"] = scale.reshape(())
            tensors[f"{module}.input_scale"] = (amax[module] / FP8_MAX).reshape(())
        else:
            tensors[name] = tensor.contiguous()
    for layer in range(model.config.num_hidden_layers):
        tensors[f"model.layers.{layer}.self_attn.k_proj.k_scale"] = torch.tensor(0.05 + 0.01 * layer)
        tensors[f"model.layers.{layer}.self_attn.v_proj.v_scale"] = torch.tensor(0.02 + 0.01 * layer)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "hf_quant_config.json").write_text(
        json.dumps(
            {
                "producer": {"name": "modelopt", "version": "0.19.0"},
                "quantization": {
                    "quant_algo": "FP8",
                    "kv_cache_quant_algo": "FP8",
                    "exclude_modules": ["lm_head"],
                },
            }
        )
    )
    return folder


def write_block(folder: Path, ct_channel: Path) -> Path:
    """ct_channel's layout with 128 x 128 block weight scales (hand-made: the package's FP8_BLOCK preset
    quantizes activations by 128-groups, which fxllm does not read)."""
    copy_checkpoint(ct_channel, folder)
    model = float_model()
    tensors = checkpoint_tensors(folder)
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0].endswith(LINEARS) and name.endswith(".weight"):
            tensors[name], tensors[name.replace(".weight", ".weight_scale")] = quantize_weight(
                tensor, "block"
            )
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    edit_config(folder, {"weights.strategy": "block", "weights.block_structure": [128, 128]})
    return folder


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's model.safetensors."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def edit_config(folder: Path, edit: dict[str, object]) -> None:
    """Set `section.field` keys of the compressed-tensors group_0 scheme in config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    for key, value in edit.items():
        section, _, field = key.partition(".")
        group[section][field] = value
    path.write_text(json.dumps(config))


def copy_checkpoint(folder: Path, dest: Path) -> Path:
    """A copy of a checkpoint folder at `dest` (new)."""
    dest.mkdir()
    for file in folder.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    return dest


def assert_edit_fails_at_load(folder: Path, dest: Path, edit: dict[str, object], message: str) -> None:
    """A copy of `folder` at `dest` with `edit` applied (edit_config) fails to load with `message`."""
    edited = copy_checkpoint(folder, dest)
    edit_config(edited, edit)
    with pytest.raises(Fp8CheckpointError, match=message):
        load_model(str(edited))


def dequantized_model(model: torch.nn.Module, activations: str | None) -> torch.nn.Module:
    """tiny-llama with each FP8 layer of `model` as a float nn.Linear over its dequantized weight, its input
    quantized by hook: "tensor" per tensor (dynamic), any other value the layer's own way (per token, or its
    static input scale), None not at all."""
    reference = float_model()
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        linear = reference.get_submodule(name)
        linear.weight.data = dequantize_weight(module.weight, module.weight_scale)
        if activations is None:
            continue

        def hook(
            _m: torch.nn.Module,
            args: tuple[torch.Tensor, ...],
            scale: torch.Tensor | None = module.input_scale,
        ) -> tuple[torch.Tensor]:
            x = args[0]
            xq, xs = (
                quantize_activation_tensor(x) if activations == "tensor" else quantize_activation(x, scale)
            )
            return ((xq.float() * xs).to(x.dtype),)

        linear.register_forward_pre_hook(hook)
    return reference.eval()


def prompt_logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits over every PROMPTS token, prompts one after another."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([p])).logits[0] for p in PROMPTS])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def hf_greedy(model: torch.nn.Module, new_tokens: int) -> list[list[int]]:
    """Hugging Face greedy `generate` of exactly `new_tokens` tokens after each of PROMPTS."""
    tokens = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            tokens.append(out[0, len(prompt) :].tolist())
    return tokens
