"""An EAGLE-3 head in the public checkpoint layout, as a small torch module over a paged KV cache.

Layout (LlamaForCausalLMEagle3, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): a folder with config.json (a Llama
config with `draft_vocab_size`, optionally `target_hidden_size` and
`eagle_config.eagle_aux_hidden_state_layer_ids`) and weights (safetensors or pytorch_model.bin):

    fc.weight                                  [H, 3 * target_H]  the three target layers -> H
    midlayer.input_layernorm.weight            [H]   on the token embedding
    midlayer.hidden_norm.weight                [H]   on the hidden state
    midlayer.self_attn.{q,k,v}_proj.weight     [heads * D, 2 * H] (embedding | hidden, concatenated)
    midlayer.self_attn.o_proj.weight           [H, heads * D]
    midlayer.post_attention_layernorm.weight   [H]
    midlayer.mlp.{gate,up,down}_proj.weight
    norm.weight                                [H]
    lm_head.weight                             [draft_vocab, H]
    d2t                                        [draft_vocab] int64: target id = draft id + d2t[draft id]
    t2d                                        [vocab] bool (not needed to draft)
    embed_tokens.weight                        optional; else the target's embedding

One step of the head over rows (token t_{p+1}, hidden h_p, position p): h = fc(h) when h is the target's
(3 * target_H wide), else the head's own previous output; x = [input_layernorm(embed(t)) |
hidden_norm(h)]; h + attention(x) -> + mlp(post_attention_layernorm(.)) = prenorm; logits =
lm_head(norm(prenorm)) over the draft vocabulary. The prenorm output is the next draft step's hidden.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ARCHITECTURE = "LlamaForCausalLMEagle3"


@dataclass
class Eagle3HeadConfig:
    """What the head's config.json says (Llama keys plus the EAGLE-3 ones)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: list[int] | None
    raw: dict[str, Any]  # the whole config.json (rope settings are read from it by transformers)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Eagle3HeadConfig:
        """Parse config.json; fails naming a missing key."""
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            if key not in data:
                raise ValueError(f"EAGLE-3 head config.json has no {key!r}")
        hidden, heads = int(data["hidden_size"]), int(data["num_attention_heads"])
        eagle = data.get("eagle_config") or {}
        layers = eagle.get("eagle_aux_hidden_state_layer_ids") or data.get("eagle_aux_hidden_state_layer_ids")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            vocab_size=int(data["vocab_size"]),
            draft_vocab_size=int(data.get("draft_vocab_size") or data["vocab_size"]),
            target_hidden_size=int(data.get("target_hidden_size") or hidden),
            aux_layer_ids=[int(i) for i in layers] if layers else None,
            raw=dict(data),
        )


def read_head_config(folder: str | Path) -> Eagle3HeadConfig:
    """The head's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"speculative.model={folder}: no config.json (an EAGLE-3 head folder is expected)")
    return Eagle3HeadConfig.from_dict(json.loads(path.read_text()))


def read_head_weights(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of the head folder (*.safetensors, else pytorch_model.bin)."""
    root = Path(folder)
    files = sorted(root.glob("*.safetensors"))
    tensors: dict[str, Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for file in files:
            tensors.update(load_file(str(file)))
    elif (root / "pytorch_model.bin").is_file():
        tensors = torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"speculative.model={folder}: no *.safetensors or pytorch_model.bin")
    return {_canonical_name(name): tensor for name, tensor in tensors.items()}


def _canonical_name(name: str) -> str:
    """Names of re-packaged heads (`model.` prefix, `layers.0.` for the one layer) in the original layout."""
    name = name.removeprefix("model.")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32, as Hugging Face's Llama does."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on [T, heads, D] with cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Eagle3Head(nn.Module):
    """The head's weights and its forward over a flat batch of rows with a paged KV cache."""

    def __init__(self, config: Eagle3HeadConfig, tensors: dict[str, Tensor], embedding: Tensor) -> None:
        super().__init__()
        self.config = config
        missing = [name for name in _REQUIRED if name not in tensors]
        if missing:
            raise ValueError(
                f"EAGLE-3 head weights lack {missing} (layout: fxllm/runtime/speculative/eagle3_head.py)"
            )
        self.weights = {name: tensors[name] for name in _REQUIRED}
        want_fc = (config.hidden_size, 3 * config.target_hidden_size)
        if tuple(self.weights["fc.weight"].shape) != want_fc:
            raise ValueError(
                f"EAGLE-3 head fc.weight is {tuple(self.weights['fc.weight'].shape)}, expected {want_fc}"
            )
        self.embedding = tensors.get("embed_tokens.weight", embedding)
        d2t = tensors.get("d2t")
        self.d2t = d2t.long() if d2t is not None else torch.zeros(config.draft_vocab_size, dtype=torch.long)
        self.scale = config.head_dim**-0.5
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        known = {k: v for k, v in config.raw.items() if k not in ("architectures", "eagle_config")}
        self.rotary = LlamaRotaryEmbedding(LlamaConfig(**known))

    def to_device(self, device: torch.device, dtype: torch.dtype) -> Eagle3Head:
        """Move every tensor (the embedding stays the target's, already in place)."""
        self.weights = {k: v.to(device=device, dtype=dtype) for k, v in self.weights.items()}
        self.embedding = self.embedding.to(device=device, dtype=dtype)
        self.d2t = self.d2t.to(device)
        self.rotary = self.rotary.to(device)
        return self

    def forward(  # type: ignore[override]
        self,
        input_ids: Tensor,
        hidden: Tensor,
        positions: Tensor,
        attention: Any,
        k_cache: Tensor,
        v_cache: Tensor,
        slot_mapping: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        query_start_loc: Tensor,
    ) -> Tensor:
        """Prenorm output [R, H] for rows (token, hidden, position); K/V are written at `slot_mapping`."""
        c, w = self.config, self.weights
        if hidden.shape[-1] != c.hidden_size:  # the target's concatenated layers
            hidden = F.linear(hidden.to(w["fc.weight"].dtype), w["fc.weight"])
        residual = hidden
        embeds = F.embedding(input_ids, self.embedding)
        x = torch.cat([
            _rms(embeds, w["midlayer.input_layernorm.weight"], c.rms_norm_eps),
            _rms(hidden, w["midlayer.hidden_norm.weight"], c.rms_norm_eps),
        ], dim=-1)  # fmt: skip
        rows = x.shape[0]
        q = F.linear(x, w["midlayer.self_attn.q_proj.weight"]).view(rows, c.num_attention_heads, c.head_dim)
        k = F.linear(x, w["midlayer.self_attn.k_proj.weight"]).view(rows, c.num_key_value_heads, c.head_dim)
        v = F.linear(x, w["midlayer.self_attn.v_proj.weight"]).view(rows, c.num_key_value_heads, c.head_dim)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0].to(q.dtype), sin[0].to(q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = attention(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, self.scale
        )
        hidden = residual + F.linear(out.reshape(rows, -1), w["midlayer.self_attn.o_proj.weight"])
        normed = _rms(hidden, w["midlayer.post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = F.linear(normed, w["midlayer.mlp.gate_proj.weight"])
        up = F.linear(normed, w["midlayer.mlp.up_proj.weight"])
        return hidden + F.linear(F.silu(gate) * up, w["midlayer.mlp.down_proj.weight"])

    def draft_tokens(self, prenorm: Tensor) -> Tensor:
        """Greedy target-vocabulary ids [R] from prenorm rows (argmax over the draft vocabulary, mapped by d2t)."""
        c, w = self.config, self.weights
        logits = F.linear(_rms(prenorm, w["norm.weight"], c.rms_norm_eps), w["lm_head.weight"])
        best = logits.argmax(dim=-1)
        return best + self.d2t[best]


_REQUIRED = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
)


def write_random_head(
    folder: str | Path,
    target_config: Any,
    *,
    draft_vocab_size: int | None = None,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random-weight EAGLE-3 head for `target_config` (an HF config) in the public layout (tests,
    benchmarks: no hub download). The draft vocabulary is the target's first `draft_vocab_size` ids spread
    over the target vocabulary through d2t (every other id), so the mapping is exercised."""
    from safetensors.torch import save_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    hidden = int(target_config.hidden_size)
    heads = int(target_config.num_attention_heads)
    kv_heads = int(getattr(target_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(target_config, "head_dim", None) or hidden // heads)
    inter = int(target_config.intermediate_size)
    vocab = int(target_config.vocab_size)
    draft_vocab = min(draft_vocab_size or vocab, vocab)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen) * std

    stride = max(1, vocab // draft_vocab)
    targets = torch.arange(draft_vocab) * stride
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[targets] = True
    tensors = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(draft_vocab, hidden),
        "d2t": targets - torch.arange(draft_vocab),
        "t2d": t2d,
    }
    floats = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in floats.items()}, str(root / "model.safetensors"))
    rope = getattr(target_config, "rope_parameters", None) or {}
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": float(getattr(target_config, "rms_norm_eps", 1e-6)),
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab,
        "target_hidden_size": hidden,
        "max_position_embeddings": int(getattr(target_config, "max_position_embeddings", 2048)),
        "rope_theta": float(rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))),
    }
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root
