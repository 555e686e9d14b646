"""FP8 checkpoints: recognise a compressed-tensors or ModelOpt FP8 folder and say how each linear is stored.

Two layouts are read (docs/quantization.md, "FP8 checkpoints"):
* compressed-tensors: config.json `quantization_config` with `quant_method: compressed-tensors`, format
  `float-quantized`, config groups whose weights are 8-bit floats (strategy channel, tensor or 128 x 128
  block) and whose input activations are dynamic per token, dynamic per tensor or static per tensor; an
  `ignore` list; an optional `kv_cache_scheme` (per-tensor or per-head `k_scale` / `v_scale`).
* ModelOpt: `hf_quant_config.json` (or config.json `quantization_config` with `quant_method: modelopt`) with
  `quant_algo: FP8` (per-tensor weight and static per-tensor input scales) or `FP8_PER_CHANNEL_PER_TOKEN`,
  `exclude_modules`, and `kv_cache_quant_algo: FP8` (per-layer `k_scale` / `v_scale`).
Anything else with a quantization config fails here, naming the key that is not supported.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELOPT_FILE = "hf_quant_config.json"
_CT_WEIGHT_STRATEGIES = {"channel": "channel", "tensor": "tensor", "block": "block"}


class Fp8CheckpointError(ValueError):
    """A quantized checkpoint fxllm cannot serve as it is; the message names the key or tensor."""


@dataclass(frozen=True)
class Fp8LayerScheme:
    """How one linear layer of the checkpoint is stored: weight scale granularity, activation scheme."""

    weight: str  # "channel" ([N, 1]) | "tensor" ([1]) | "block" ([ceil(N/128), ceil(K/128)])
    activations: str  # "dynamic_token" | "dynamic_tensor" | "static_tensor" (the checkpoint's input_scale)


@dataclass
class Fp8Checkpoint:
    """What an FP8 checkpoint's config says: its format, which linears are FP8 and how, and its KV scales."""

    format: str  # "compressed-tensors" | "modelopt"
    groups: list[tuple[list[str], Fp8LayerScheme]]  # (targets, scheme); first match wins
    ignore: list[str] = field(default_factory=list)
    kv_cache: str | None = None  # "tensor" | "head" when the checkpoint has FP8 KV scales

    def scheme_for(self, module_name: str, class_name: str = "Linear") -> Fp8LayerScheme | None:
        """The scheme of the linear `module_name`, or None when it stays in float (ignored or untargeted)."""
        if any(_matches(module_name, class_name, p, self.format) for p in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(module_name, class_name, t, self.format) for t in targets):
                return scheme
        return None

    def describe(self) -> str:
        """One line for the start-up log."""
        schemes = ", ".join(f"{s.weight} weights / {s.activations} activations" for _, s in self.groups)
        kv = f", FP8 KV scales ({self.kv_cache})" if self.kv_cache else ""
        return f"{self.format} FP8 checkpoint: {schemes}; ignore {self.ignore}{kv}"


def _matches(name: str, class_name: str, pattern: str, fmt: str) -> bool:
    if fmt == "modelopt":  # exclude_modules are fnmatch patterns over module paths
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")
    if pattern.startswith("re:"):  # compressed-tensors: a regex matched from the start of the path
        return re.match(pattern[3:], name) is not None
    return pattern in (name, class_name) or name.endswith(f".{pattern}")


def read_fp8_checkpoint(folder: Path, quantization_config: Any) -> Fp8Checkpoint | None:
    """The FP8 scheme of the checkpoint in `folder` (None for a float checkpoint); fails on unsupported ones."""
    modelopt_file = folder / MODELOPT_FILE
    if modelopt_file.is_file():
        raw = json.loads(modelopt_file.read_text())
        return _modelopt(raw.get("quantization", raw), f"{modelopt_file}")
    if quantization_config is None:
        return None
    qc = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    method = qc.get("quant_method")
    origin = f"{folder}/config.json quantization_config"
    if method == "compressed-tensors":
        return _compressed_tensors(qc, origin)
    if method == "modelopt":
        return _modelopt(qc.get("quantization", qc), origin)
    raise Fp8CheckpointError(
        f"{origin}: quant_method {method!r} is not supported; fxllm serves float checkpoints and FP8 ones "
        "(compressed-tensors float-quantized, ModelOpt FP8): use the unquantized model folder, or a .gguf file"
    )


def _modelopt(qc: dict[str, Any], origin: str) -> Fp8Checkpoint:
    algo = qc.get("quant_algo")
    if algo == "FP8":
        scheme = Fp8LayerScheme("tensor", "static_tensor")
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
        scheme = Fp8LayerScheme("channel", "dynamic_token")
    else:
        raise Fp8CheckpointError(
            f"{origin}: quant_algo {algo!r} is not supported; fxllm reads ModelOpt quant_algo FP8 and "
            "FP8_PER_CHANNEL_PER_TOKEN"
        )
    kv_algo = qc.get("kv_cache_quant_algo")
    if kv_algo not in (None, "FP8"):
        raise Fp8CheckpointError(f"{origin}: kv_cache_quant_algo {kv_algo!r} is not supported (only FP8)")
    exclude = list(qc.get("exclude_modules") or qc.get("ignore") or [])
    return Fp8Checkpoint("modelopt", [(["*"], scheme)], exclude, "tensor" if kv_algo == "FP8" else None)


def _compressed_tensors(qc: dict[str, Any], origin: str) -> Fp8Checkpoint:
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise Fp8CheckpointError(f"{origin}: {key} is not supported (fxllm reads dense FP8 checkpoints)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise Fp8CheckpointError(
            f"{origin}: quantization_status {status!r}: only 'compressed' checkpoints hold e4m3 weights"
        )
    groups_raw = qc.get("config_groups") or {}
    if not groups_raw:
        raise Fp8CheckpointError(f"{origin}: no config_groups")
    top_format = qc.get("format")
    groups = []
    for name, group in groups_raw.items():
        where = f"{origin}.config_groups.{name}"
        fmt = group.get("format") or top_format
        if fmt != "float-quantized":
            raise Fp8CheckpointError(
                f"{where}: format {fmt!r} is not supported; fxllm reads 'float-quantized' (FP8) groups"
            )
        if group.get("output_activations"):
            raise Fp8CheckpointError(f"{where}.output_activations: output quantization is not supported")
        targets = list(group.get("targets") or [])
        groups.append((targets, Fp8LayerScheme(_ct_weights(group, where), _ct_activations(group, where))))
    kv = _ct_kv(qc.get("kv_cache_scheme"), f"{origin}.kv_cache_scheme")
    return Fp8Checkpoint("compressed-tensors", groups, list(qc.get("ignore") or []), kv)


def _fp8_args(args: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if not args:
        raise Fp8CheckpointError(f"{where}: missing (fxllm::fp8_linear needs FP8 weights and activations)")
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise Fp8CheckpointError(
            f"{where}: type {args.get('type')!r} with num_bits {args.get('num_bits')!r} is not supported; "
            "fxllm reads 8-bit float (e4m3) only"
        )
    if args.get("symmetric") is False:
        raise Fp8CheckpointError(f"{where}: asymmetric FP8 (a zero point) is not supported")
    if args.get("dynamic", False) not in (True, False):  # e.g. "local" (NVFP4's global + local scales)
        raise Fp8CheckpointError(f"{where}.dynamic {args.get('dynamic')!r} is not supported (true or false)")
    return args


def _ct_weights(group: dict[str, Any], where: str) -> str:
    args = _fp8_args(group.get("weights"), f"{where}.weights")
    strategy = args.get("strategy")
    if strategy not in _CT_WEIGHT_STRATEGIES or args.get("dynamic"):
        raise Fp8CheckpointError(
            f"{where}.weights: strategy {strategy!r} (dynamic {args.get('dynamic')}) is not supported; fxllm "
            "reads static channel, tensor or 128 x 128 block weight scales"
        )
    if strategy == "block" and list(args.get("block_structure") or []) != [128, 128]:
        raise Fp8CheckpointError(
            f"{where}.weights.block_structure {args.get('block_structure')} is not supported (only [128, 128])"
        )
    return _CT_WEIGHT_STRATEGIES[strategy]


def _ct_activations(group: dict[str, Any], where: str) -> str:
    args = _fp8_args(group.get("input_activations"), f"{where}.input_activations")
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic"))
    if strategy == "token" and dynamic:
        return "dynamic_token"
    if strategy == "tensor":
        return "dynamic_tensor" if dynamic else "static_tensor"
    raise Fp8CheckpointError(
        f"{where}.input_activations: strategy {strategy!r} with dynamic {dynamic} (group_size "
        f"{args.get('group_size')}) is not supported; fxllm::fp8_linear quantizes activations per token "
        "(dynamic), per tensor (dynamic) or with one static per-tensor input_scale"
    )


def _ct_kv(args: dict[str, Any] | None, where: str) -> str | None:
    if not args:
        return None
    _fp8_args(args, where)
    strategy = args.get("strategy")
    if args.get("dynamic") or strategy not in ("tensor", "attn_head"):
        raise Fp8CheckpointError(
            f"{where}: strategy {strategy!r} (dynamic {args.get('dynamic')}) is not supported; fxllm reads "
            "static per-tensor or per-head k_scale / v_scale"
        )
    return "tensor" if strategy == "tensor" else "head"
