"""Tests for fxllm.models: embedded default, presets, HF folders, GGUF files, the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

from fxllm.models import (
    LoadedModel,
    ModelSpec,
    embedded_gguf_path,
    get_model_spec,
    list_presets,
    load_model,
    preset_config,
    register_model,
    unregister_model,
)
from fxllm.models.presets import materialize_random_
from fxllm.models.safetensors_loader import build_empty_model

TINY = [p for p in list_presets() if p.startswith("tiny-")]
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 7, 250, 11]])


@pytest.fixture(scope="module")
def embedded(smollm2: LoadedModel) -> LoadedModel:
    """The session's shared SmolLM2 (conftest.py), loaded by `load_model("smollm2")`: read, never modified."""
    return smollm2


def _greedy(lm: LoadedModel, ids: torch.Tensor, n: int) -> list[int]:
    out = lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_embedded_generates_deterministically(embedded: LoadedModel) -> None:
    tok = embedded.tokenizer
    assert embedded.source == "embedded" and embedded.name == "smollm2"
    assert tok is not None and tok.chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids = enc["input_ids"]
    first, second = _greedy(embedded, ids, 8), _greedy(embedded, ids, 8)
    assert first == second
    assert "Paris" in tok.decode(first)


def test_embedded_is_plain_float_model(embedded: LoadedModel) -> None:
    model = embedded.model
    assert not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gguf_path_matches_embedded(embedded: LoadedModel) -> None:
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    lm = load_model(str(path))
    assert lm.source == "gguf" and lm.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(lm.model(PROMPT).logits, embedded.model(PROMPT).logits)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_forward_and_generate(name: str) -> None:
    lm = load_model(name)
    assert lm.source == "preset" and lm.tokenizer is None
    assert all(not p.is_meta for p in lm.model.parameters())
    assert all(not b.is_meta for b in lm.model.buffers())
    with torch.no_grad():
        logits = lm.model(PROMPT).logits
    assert logits.shape == (1, PROMPT.shape[1], lm.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Not degenerate: different positions prefer different tokens, and greedy decoding moves on.
    assert len(set(logits[0].argmax(-1).tolist())) >= 4
    tokens = _greedy(lm, PROMPT, 24)
    assert len(set(tokens)) >= 5, tokens
    assert len(set(tokens[:12])) > 1, tokens


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_eager_attention_matches_sdpa(name: str) -> None:
    eager = load_model(name, attn_implementation="eager")
    sdpa = load_model(name)
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    ids = torch.arange(3, 43).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(eager.model(ids).logits, sdpa.model(ids).logits)


def test_softcapped_model_defaults_to_eager() -> None:
    # transformers' sdpa path drops Gemma2's attention softcapping, so the default must be eager.
    assert load_model("tiny-gemma2", device="meta").config._attn_implementation == "eager"


def test_sliding_window_matters_in_tiny_mistral() -> None:
    lm = load_model("tiny-mistral")
    ids = torch.arange(3, 43).unsqueeze(0)  # 40 tokens > window 16
    with torch.no_grad():
        windowed = lm.model(ids).logits
        lm.model.config.sliding_window = None
        full = lm.model(ids).logits
    torch.testing.assert_close(windowed[:, :16], full[:, :16])
    assert not torch.allclose(windowed[:, 20:], full[:, 20:])


def test_presets_deterministic_per_seed() -> None:
    a, b, c = load_model("tiny-llama"), load_model("tiny-llama"), load_model("tiny-llama", seed=1)
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_preset_tiny_variants_have_their_features() -> None:
    assert preset_config("tiny-mistral").sliding_window == 16
    gemma = preset_config("tiny-gemma2")
    assert gemma.attn_logit_softcapping and gemma.final_logit_softcapping
    assert "sliding_attention" in gemma.layer_types and "full_attention" in gemma.layer_types
    assert gemma.query_pre_attn_scalar != gemma.head_dim
    assert load_model("tiny-qwen2", device="meta").model.model.layers[0].self_attn.q_proj.bias is not None
    qwen3 = load_model("tiny-qwen3", device="meta").model
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm")
    phi3 = load_model("tiny-phi3", device="meta").model
    assert hasattr(phi3.model.layers[0].self_attn, "qkv_proj") and hasattr(
        phi3.model.layers[0].mlp, "gate_up_proj"
    )


def test_gemma_norms_are_zero_centered() -> None:
    gemma = load_model("tiny-gemma2").model
    # Gemma2 norms compute x * (1 + w): neutral weights are around 0, not 1.
    assert gemma.model.norm.weight.abs().mean() < 0.5
    llama = load_model("tiny-llama").model
    assert (llama.model.norm.weight - 1).abs().mean() < 0.5


def test_llama_8b_config_is_real() -> None:
    c = preset_config("llama-3.1-8b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 128256)
    assert c.max_position_embeddings == 131072 and c.rms_norm_eps == 1e-5 and not c.tie_word_embeddings
    rope = c.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    assert rope["low_freq_factor"] == 1.0 and rope["high_freq_factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 8192
    q = preset_config("qwen2.5-7b")
    assert (q.hidden_size, q.num_hidden_layers, q.num_key_value_heads, q.vocab_size) == (3584, 28, 4, 152064)
    m = preset_config("mistral-7b")
    assert (m.sliding_window, m.vocab_size, m.rope_parameters["rope_theta"]) == (4096, 32000, 10000.0)


def test_llama_8b_on_meta_device_counts_params() -> None:
    lm = load_model("llama-3.1-8b", device="meta")
    assert all(p.is_meta for p in lm.model.parameters())
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(8.03e9, rel=1e-3)


def test_num_layers_override_keeps_first_layers() -> None:
    full = load_model("tiny-gemma2")
    short = load_model("tiny-gemma2", num_layers=1)
    assert short.config.num_hidden_layers == 1 and len(short.model.model.layers) == 1
    assert short.config.layer_types == full.config.layer_types[:1]
    assert torch.equal(
        short.model.model.layers[0].mlp.up_proj.weight, full.model.model.layers[0].mlp.up_proj.weight
    )
    deep = load_model("qwen2.5-7b", device="meta", num_layers=3)
    assert len(deep.model.model.layers) == 3


def test_hf_folder_roundtrip_sharded(tmp_path: Path) -> None:
    ref = load_model("tiny-qwen2").model
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    lm = load_model(str(tmp_path))
    assert lm.source == "hf_folder" and lm.tokenizer is None
    assert torch.equal(lm.model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.equal(lm.model(PROMPT).logits, ref(PROMPT).logits)


def test_hf_folder_tied_dtype_and_num_layers(tmp_path: Path) -> None:
    ref = load_model("tiny-gemma2").model
    ref.save_pretrained(tmp_path, safe_serialization=True)
    bf16 = load_model(str(tmp_path), dtype="bfloat16")
    assert bf16.model.lm_head.weight is bf16.model.model.embed_tokens.weight
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.model.model.embed_tokens.weight, ref.model.embed_tokens.weight.to(torch.bfloat16))
    short = load_model(str(tmp_path), num_layers=2)
    assert len(short.model.model.layers) == 2


def test_hf_folder_missing_weights_fail_loudly(tmp_path: Path) -> None:
    load_model("tiny-llama").model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_model(str(tmp_path))


def test_unknown_spec_error_lists_forms() -> None:
    with pytest.raises(ValueError) as err:
        load_model("no-such-model")
    text = str(err.value)
    assert "smollm2" in text and "llama-3.1-8b" in text and "tiny-llama" in text
    assert ".gguf" in text and "config.json" in text
    with pytest.raises(ValueError, match="Hub id"):
        load_model("meta-llama/Llama-3.1-8B")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", dtype="int3")


class _TaggedMLP(nn.Module):
    """Wraps an MLP so tests can see the swap happened; forward is unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_register_model_swaps_submodules(tmp_path: Path) -> None:
    calls: list[str] = []

    def fixups(raw: dict) -> dict:
        calls.append("config")
        return raw

    spec = ModelSpec(
        name="test-tagged-llama",
        architectures=["LlamaForCausalLM"],
        config_fixups=fixups,
        submodule_swaps={"LlamaMLP": lambda module, config: _TaggedMLP(module)},
        weight_mapping=lambda key: key.replace(".mlp.", ".mlp.inner."),
    )
    ref = load_model("tiny-llama").model
    ref.save_pretrained(tmp_path, safe_serialization=True)
    register_model(spec)
    try:
        assert get_model_spec("LlamaForCausalLM") is spec
        with pytest.raises(ValueError, match="already registered"):
            register_model(ModelSpec(name="other", architectures=["LlamaForCausalLM"]))
        preset = load_model("tiny-llama")
        assert all(isinstance(layer.mlp, _TaggedMLP) for layer in preset.model.model.layers)
        folder = load_model(str(tmp_path))
        assert all(isinstance(layer.mlp, _TaggedMLP) for layer in folder.model.model.layers)
        assert calls == ["config", "config"]
        with torch.no_grad():
            assert torch.equal(folder.model(PROMPT).logits, ref(PROMPT).logits)
    finally:
        unregister_model(spec.name)
    assert get_model_spec("LlamaForCausalLM") is None


def test_materialize_uses_neutral_norms_on_custom_config() -> None:
    config: PretrainedConfig = preset_config("tiny-llama", num_layers=1)
    model = build_empty_model(config, dtype=torch.float32, attn_implementation="sdpa", spec=None)
    materialize_random_(model, device=torch.device("cpu"), dtype=torch.float16, seed=3)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.model.layers[0].input_layernorm.weight.float().mean().item() == pytest.approx(1.0, abs=0.1)
