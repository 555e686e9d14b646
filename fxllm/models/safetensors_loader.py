"""HF model folders: meta-device init, then (sharded) safetensors streamed straight to device and dtype."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from fxllm.models.presets import set_num_layers
from fxllm.models.registry import ModelSpec, apply_config_fixups, apply_model_spec, find_model_spec
from fxllm.quantization.checkpoint import read_fp8_checkpoint
from fxllm.quantization.checkpoint_modules import attach_kv_scales_, is_kv_scale_key, swap_fp8_linears_

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def pick_attn_implementation(config: PretrainedConfig, requested: str | None) -> str:
    """The attention implementation to build with: `requested`, else sdpa unless the model needs eager."""
    # transformers' sdpa path silently drops attention logit softcapping (Gemma2), so the reference
    # model would not be the real architecture; eager computes it.
    softcap = getattr(config, "attn_logit_softcapping", None) is not None
    if requested is None:
        return "eager" if softcap else "sdpa"
    if requested == "sdpa" and softcap:
        logger.warning(
            "%s: sdpa ignores attn_logit_softcapping; outputs differ from the real model", config.model_type
        )
    return requested


def build_empty_model(
    config: PretrainedConfig, *, dtype: torch.dtype, attn_implementation: str | None, spec: ModelSpec | None
) -> PreTrainedModel:
    """Instantiate `config`'s causal LM with parameters on the meta device and real CPU buffers."""
    # Buffers stay real so non-persistent ones (rotary inv_freq, Gemma's embed_scale) are computed
    # exactly as transformers computes them; they are tiny, parameters are not.
    attn_implementation = pick_attn_implementation(config, attn_implementation)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    # Tie outside the context: it re-creates every assigned Parameter, which would untie them again.
    model.tie_weights()
    if spec is not None and spec.submodule_swaps:
        with init_empty_weights(include_buffers=False):
            apply_model_spec(model, spec)
        model.tie_weights()
    return model


def move_buffers_(model: nn.Module, device: torch.device) -> None:
    """Move every buffer to `device`, keeping its dtype (rotary tables stay float32 like in HF)."""
    for module in model.modules():
        for leaf, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[leaf] = buf.to(device)


def config_from_dict(raw: dict[str, Any], origin: str, spec: ModelSpec) -> PretrainedConfig:
    """Config object for a raw config dict that `spec`'s fixups produced."""
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{origin}: model_type {model_type!r} (after fixups of ModelSpec {spec.name!r}) is not a "
            "transformers architecture; make config_fixups map it onto one (e.g. 'llama')"
        )
    return CONFIG_MAPPING[model_type].from_dict(raw)


def read_config(folder: Path) -> tuple[PretrainedConfig, ModelSpec | None]:
    """Build the config in `folder`/config.json, after the registered spec's fixups (if any)."""
    raw: dict[str, Any] = json.loads((folder / "config.json").read_text())
    spec = find_model_spec(raw.get("architectures"))
    if spec is None or spec.config_fixups is None:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    else:
        config = config_from_dict(apply_config_fixups(raw, spec), f"{folder}/config.json", spec)
    # A quantization_config is read by load_hf_folder (read_fp8_checkpoint): FP8 is served as it is, others fail.
    return config, spec


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found pytorch_model*.bin: re-save with save_pretrained(..., safe_serialization=True))"
        has_bin = any(folder.glob("pytorch_model*.bin"))
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint if has_bin else ''}")
    return files


def _safe_open_device(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _tensor_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every state-dict name -> (module, attribute, is_parameter), all aliases of a tied tensor together."""
    by_id: dict[int, list[tuple[str, nn.Module, str, bool]]] = defaultdict(list)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for leaf, p in module._parameters.items():
            if p is not None:
                by_id[id(p)].append((prefix + leaf, module, leaf, True))
        for leaf, b in module._buffers.items():
            if b is not None and leaf not in module._non_persistent_buffers_set:
                by_id[id(b)].append((prefix + leaf, module, leaf, False))
    slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for group in by_id.values():
        targets = [(m, leaf, is_p) for _, m, leaf, is_p in group]
        for name, *_ in group:
            slots[name] = targets
    return slots


def _target_name(key: str, slots: dict[str, Any], spec: ModelSpec | None) -> str:
    name = spec.weight_mapping(key) if spec is not None and spec.weight_mapping is not None else key
    # Base-model checkpoints (LlamaModel) lack the "model." prefix of the *ForCausalLM class.
    if name not in slots and f"model.{name}" in slots:
        return f"model.{name}"
    return name


@torch.no_grad()
def load_safetensors_(
    model: nn.Module,
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    spec: ModelSpec | None,
    skip: Callable[[str], bool] | None = None,
) -> None:
    """Stream all shards of `folder` into the meta-initialized `model` on `device`, casting floats to `dtype`
    (FP8 checkpoint layers keep theirs); `skip(key)` names tensors read elsewhere (KV scales)."""
    slots = _tensor_slots(model)
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    files = _shard_files(folder)
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += len(list(f.keys()))
    loaded: set[int] = set()  # ids of slot groups, so every alias of a tied tensor counts as loaded
    unexpected: list[str] = []
    with tqdm(total=total, desc=f"loading {folder.name}", unit="tensor", disable=None) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device=_safe_open_device(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    bar.update(1)
                    if skip is not None and skip(key):
                        continue
                    name = _target_name(key, slots, spec)
                    if name not in slots:
                        layer = _LAYER_RE.search(name)
                        # Layers beyond a num_layers override are skipped on purpose, not unexpected.
                        if not (layer and num_layers is not None and int(layer.group(1)) >= num_layers):
                            unexpected.append(key)
                        continue
                    _assign(slots[name], f.get_tensor(key), name, dtype)
                    loaded.add(id(slots[name]))
    if unexpected:
        logger.warning(
            "ignored %d checkpoint tensor(s) not in the model: %s", len(unexpected), unexpected[:8]
        )
    # Persistent buffers absent from the checkpoint keep their constructed values; parameters must load.
    missing = sorted(
        n for n, group in slots.items() if id(group) not in loaded and any(p for _, _, p in group)
    )
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} model parameter(s) missing from the checkpoint, e.g. {missing[:8]}; "
            "if the checkpoint uses other tensor names, register a ModelSpec with a weight_mapping"
        )


def _assign(
    targets: list[tuple[nn.Module, str, bool]], t: torch.Tensor, name: str, dtype: torch.dtype
) -> None:
    module, leaf, is_param = targets[0]
    # An FP8 checkpoint layer (Fp8Linear): its e4m3 weight and float32 scales keep their dtypes.
    adapt = getattr(module, "fxllm_adapt_tensor", None)
    if adapt is not None:
        t = adapt(leaf, t, name)
    current = module._parameters[leaf] if is_param else module._buffers[leaf]
    if tuple(current.shape) != tuple(t.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, model expects {tuple(current.shape)}: "
            "does config.json match the weights?"
        )
    if is_param:
        cast = t.is_floating_point() and adapt is None
        value: torch.Tensor = nn.Parameter(t.to(dtype) if cast else t, requires_grad=False)
    else:
        value = t.to(current.dtype) if t.is_floating_point() else t
    for module, leaf, is_p in targets:
        (module._parameters if is_p else module._buffers)[leaf] = value


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        logger.info("no tokenizer files in %s; tokenizer is None", folder)
        return None
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_hf_folder(
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    num_layers: int | None,
    attn_implementation: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a HF model folder (config.json + safetensors) on `device`; dtype None = the config's dtype."""
    config, spec = read_config(folder)
    if num_layers is not None:
        set_num_layers(config, num_layers)
    if dtype is None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    model = build_empty_model(config, dtype=dtype, attn_implementation=attn_implementation, spec=spec)
    move_buffers_(model, device)
    fp8 = read_fp8_checkpoint(folder, getattr(config, "quantization_config", None))
    if fp8 is not None:  # served as stored: its linears become Fp8Linear layers over the e4m3 weights
        logger.info("%s: %s (%d FP8 linears)", folder, fp8.describe(), swap_fp8_linears_(model, fp8, dtype))
    if device.type != "meta":
        load_safetensors_(model, folder, device=device, dtype=dtype, spec=spec, skip=is_kv_scale_key)
        if fp8 is not None:
            attach_kv_scales_(model, fp8, _shard_files(folder), num_layers)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), _load_tokenizer(folder)
