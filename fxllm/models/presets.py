"""Synthetic presets: real architectures' configs with deterministic random weights."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

if TYPE_CHECKING:  # modeling_utils is seconds of imports; a warm GGUF start does not need it
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Models up to this size are initialized on CPU and then copied, so a tiny preset has bit-identical
# weights on every device (CPU reference vs GPU compiled). Bigger ones are initialized on the target
# device: a CPU generator would take minutes for 8B parameters.
_CPU_INIT_MAX_PARAMS = 64_000_000
EMBED_STD = 0.02

# Shared shape of the tiny test presets: head_dim 32 keeps fused GPU attention kernels happy.
_TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _llama_3_1_8b() -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def _llama_3_1_70b() -> PretrainedConfig:
    # Llama-3.1-70B's shapes: 8192 hidden, 64 heads over 8 KV heads, 80 layers (~141 GB in bf16).
    config = _llama_3_1_8b()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 8192, 28672, 80
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 64, 8, 128
    return config


def _qwen2_5_7b() -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        max_window_layers=28,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def _mistral_7b() -> PretrainedConfig:
    return MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=4096,
        tie_word_embeddings=False,
    )


def _qwen3_8b() -> PretrainedConfig:
    return Qwen3Config(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def _gemma2_9b() -> PretrainedConfig:
    return Gemma2Config(
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=256000,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


def _tiny_llama() -> PretrainedConfig:
    # llama3 rope scaling with a small original context so the frequency remapping really applies.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return LlamaConfig(**_TINY, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=False)


def _tiny_mistral() -> PretrainedConfig:
    # A 16-token window makes sliding-window masking observable with ~40-token prompts.
    return MistralConfig(
        **_TINY,
        rms_norm_eps=1e-5,
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _tiny_qwen2() -> PretrainedConfig:
    cfg = {k: v for k, v in _TINY.items() if k != "head_dim"}
    return Qwen2Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def _tiny_qwen3() -> PretrainedConfig:
    return Qwen3Config(**_TINY, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def _tiny_gemma2() -> PretrainedConfig:
    # Tied embeddings (Gemma2's default) exercise the tied-weight path. Small softcaps and a query_pre_attn_scalar != head_dim so that dropping either is detectable.
    return Gemma2Config(
        **{**_TINY, "num_hidden_layers": 4},
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        query_pre_attn_scalar=24,
        sliding_window=16,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
    )


def _tiny_phi3() -> PretrainedConfig:
    cfg = {k: v for k, v in _TINY.items() if k != "head_dim"}
    return Phi3Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


_PRESETS: dict[str, tuple[Callable[[], PretrainedConfig], str]] = {
    "llama-3.1-8b": (_llama_3_1_8b, "LlamaForCausalLM"),
    "llama-3.1-70b": (_llama_3_1_70b, "LlamaForCausalLM"),
    "qwen2.5-7b": (_qwen2_5_7b, "Qwen2ForCausalLM"),
    "mistral-7b": (_mistral_7b, "MistralForCausalLM"),
    "qwen3-8b": (_qwen3_8b, "Qwen3ForCausalLM"),
    "gemma2-9b": (_gemma2_9b, "Gemma2ForCausalLM"),
    "tiny-llama": (_tiny_llama, "LlamaForCausalLM"),
    "tiny-mistral": (_tiny_mistral, "MistralForCausalLM"),
    "tiny-qwen2": (_tiny_qwen2, "Qwen2ForCausalLM"),
    "tiny-qwen3": (_tiny_qwen3, "Qwen3ForCausalLM"),
    "tiny-gemma2": (_tiny_gemma2, "Gemma2ForCausalLM"),
    "tiny-phi3": (_tiny_phi3, "Phi3ForCausalLM"),
}


def list_presets() -> list[str]:
    """Names of all synthetic presets (real configs, random weights)."""
    return list(_PRESETS)


def preset_config(name: str, *, num_layers: int | None = None) -> PretrainedConfig:
    """Config of preset `name` (a fresh object), optionally with `num_layers` decoder layers."""
    key = name.lower()
    if key not in _PRESETS:
        raise KeyError(f"Unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
    factory, arch = _PRESETS[key]
    config = factory()
    config.architectures = [arch]
    config.name_or_path = key
    if num_layers is not None:
        set_num_layers(config, num_layers)
    return config


def set_num_layers(config: PretrainedConfig, num_layers: int) -> None:
    """Override the decoder layer count, keeping per-layer attention types consistent."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        # Cycle the pattern so alternating sliding/full models keep alternating when extended.
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(num_layers)]
    config.num_hidden_layers = num_layers


def _param_seed(seed: int, model_type: str, name: str) -> int:
    # Per-tensor seeds make values independent of init order and of num_layers: a 4-layer override
    # has exactly the first 4 layers of the full-depth model. The model type keeps presets that share
    # parameter names (llama/mistral) from sharing weights.
    return zlib.crc32(f"{seed}:{model_type}:{name}".encode())


def _norm_neutral_value(module: nn.Module) -> float:
    """Value of a norm weight that makes it the identity (1.0, or 0.0 for Gemma-style 1+w norms)."""
    try:
        with torch.device("cpu"):
            probe = type(module)(4)
        weight = getattr(probe, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() == 4:
            return float(weight.detach().float().mean())
    except Exception:
        logger.debug("could not probe %s for its neutral weight; assuming 1.0", type(module).__name__)
    return 1.0


def _init_tensor(module: nn.Module, leaf: str, t: torch.Tensor, gen: torch.Generator) -> None:
    """Fill `t` in place; scales keep activations O(1) so random logits are peaked but varied."""
    cls = type(module).__name__
    if isinstance(module, nn.Embedding):
        # Small, so the residual stream is dominated by the layers: with tied embeddings a large
        # embedding makes every token predict itself and greedy decoding repeats one token forever.
        t.normal_(0.0, EMBED_STD, generator=gen)
    elif isinstance(module, nn.Linear) and leaf == "weight":
        t.normal_(0.0, t.shape[-1] ** -0.5, generator=gen)
    elif "Norm" in cls and leaf == "weight":
        # Perturbed around the neutral value, so a pass that drops the norm weight changes outputs.
        t.normal_(0.0, 0.1, generator=gen).add_(_norm_neutral_value(module))
    elif leaf == "bias":
        t.normal_(0.0, 0.1, generator=gen)
    else:
        logger.debug("generic init for %s.%s", cls, leaf)
        t.normal_(0.0, 0.02, generator=gen)


@torch.no_grad()
def materialize_random_(
    model: PreTrainedModel,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Replace every meta parameter of `model` with deterministic random values on `device`; `shard(name,
    full)` keeps a tensor-parallel rank's part of each (the same values as the unsharded model's)."""
    total = sum(p.numel() for p in model.parameters())
    init_device = torch.device("cpu") if total <= _CPU_INIT_MAX_PARAMS else device
    model_type = str(getattr(model.config, "model_type", ""))
    new_params: dict[int, nn.Parameter] = {}
    slots = [
        (mod_name, module, leaf, param)
        for mod_name, module in model.named_modules()
        for leaf, param in module.named_parameters(recurse=False)
    ]
    for mod_name, module, leaf, param in tqdm(slots, desc="init random weights", unit="tensor", disable=None):
        # Tied weights share one Parameter object; keep them shared.
        if id(param) not in new_params:
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            gen = torch.Generator(device=init_device).manual_seed(_param_seed(seed, model_type, name))
            t = torch.empty(param.shape, dtype=torch.float32, device=init_device)
            _init_tensor(module, leaf, t, gen)
            if shard is not None:
                t = shard(name, t)  # one full tensor at a time: a rank never holds the whole model
            new_params[id(param)] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        module._parameters[leaf] = new_params[id(param)]
