"""FP8 checkpoint schemes beyond the presets (tests/test_fp8_checkpoints.py has those): every weight x
activation combination compressed-tensors writes, dynamic per-tensor activations (one scale per call over
the whole activation) included, config groups whose schemes differ inside one merged GEMM, the `ignore`
list, ModelOpt FP8_PER_CHANNEL_PER_TOKEN, compressed-tensors `kv_cache_scheme` scales, and bad configs /
tensors failing at load naming the key or tensor.

Tolerances (as in test_fp8_checkpoints.py): the FP8 model against the dequantized float model with the
same activation quantization applied by hook is summation order only, < 1e-5 (measured 0.0); against the
plain dequantized model the e4m3 activations alone give a ~0.1 relative logit error on tiny-llama, so
(1e-4, 0.2). That the per-tensor scheme is really per tensor: the same model with per-token activations
differs from it by far more than 1e-5 (measured 0.03-0.06), so the first bound could not hold by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fp8_checkpoint_layouts import (
    LINEARS,
    PROMPTS,
    assert_edit_fails_at_load,
    checkpoint_tensors,
    copy_checkpoint,
    ct_scheme,
    dequantized_model,
    float_model,
    hf_greedy,
    prompt_logits,
    rel_err,
    write_compressed_tensors,
    write_modelopt,
)
from safetensors.torch import save_file

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.ops.kv_quant import KV_SCALES_ATTR
from fxllm.passes.quantize_fp8 import QUANT_SCHEME_META
from fxllm.quantization.checkpoint import Fp8CheckpointError
from fxllm.quantization.checkpoint_modules import Fp8Linear
from fxllm.quantization.fp8 import (
    FP8_DTYPE,
    quantize_weight,
)
from fxllm.runtime.sampling_params import SamplingParams

pytest.importorskip("compressed_tensors")

NEW = 8
GREEDY = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0)
BASE = ["compile.backend=eager", "cache.num_blocks=32"]
COMBOS = [("channel", "tensor"), ("tensor", "tensor"), ("tensor", "token"), ("channel", "static")]


@pytest.fixture(scope="module")
def ct_tensor_dynamic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_compressed_tensors(
        tmp_path_factory.mktemp("ct_td"), {"group_0": ct_scheme("channel", "tensor")}
    )


@pytest.mark.parametrize(("weights", "activations"), COMBOS)
def test_scheme_matches_its_dequantized_model(weights: str, activations: str, tmp_path: Path) -> None:
    folder = write_compressed_tensors(tmp_path, {"group_0": ct_scheme(weights, activations)})
    model = load_model(str(folder)).model
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    expected = {"tensor": "dynamic_tensor", "token": "dynamic_token", "static": "static_tensor"}[activations]
    assert len(layers) == 14 and {(m.scheme.weight, m.scheme.activations) for m in layers} == {
        (weights, expected)
    }
    assert all((m.input_scale is not None) == (activations == "static") for m in layers)
    fp8 = prompt_logits(model)
    assert rel_err(fp8, prompt_logits(dequantized_model(model, activations))) < 1e-5
    assert 1e-4 < rel_err(fp8, prompt_logits(dequantized_model(model, None))) < 0.2
    if activations == "tensor":  # per token would be a different model: the bound above can fail
        assert rel_err(fp8, prompt_logits(dequantized_model(model, "token"))) > 1e-3


def test_llm_serves_per_tensor_dynamic_activations_merged(
    ct_tensor_dynamic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    llm = LLM(str(ct_tensor_dynamic), config=load_config(None, BASE))
    gm = llm.engine.runner.graph_module
    assert sum(p.dtype == FP8_DTYPE for p in gm.parameters()) == 8  # merged qkv, o, gate_up, down x 2 layers
    schemes = [n.meta[QUANT_SCHEME_META] for n in gm.graph.nodes if QUANT_SCHEME_META in n.meta]
    assert schemes == ["dynamic_tensor"] * 8, schemes
    # One request at a time: a per-tensor dynamic scale is one amax over every token of the step, so requests
    # batched together share it (as in vLLM) and a batch's tokens legitimately differ from solo runs.
    tokens = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert tokens == hf_greedy(load_model(str(ct_tensor_dynamic)).model, NEW)


def test_mixed_schemes_stay_unmerged_and_ignore_keeps_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    groups = {
        "group_0": ct_scheme("channel", "tensor", ("re:.*q_proj$",)),
        "group_1": ct_scheme("channel", "token", ("re:.*(k|v|o|gate|up|down)_proj$",)),
    }
    folder = write_compressed_tensors(
        tmp_path / "mixed", groups, ("lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$")
    )
    model = load_model(str(folder)).model
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert model.model.layers[0].self_attn.q_proj.scheme.activations == "dynamic_tensor"
    assert model.model.layers[0].self_attn.k_proj.scheme.activations == "dynamic_token"
    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    with caplog.at_level("INFO", logger="fxllm.passes.merge_fp8_linears"):
        llm = LLM(str(folder), config=load_config(None, BASE))
    assert caplog.text.count("stay separate: members differ in activation scheme") == 2
    gm = llm.engine.runner.graph_module
    # q, k, v separate (3) + o + gate_up in both layers, down only in layer 0 (layer 1's is ignored): 11.
    assert sum(p.dtype == FP8_DTYPE for p in gm.parameters()) == 11
    schemes = sorted(n.meta[QUANT_SCHEME_META] for n in gm.graph.nodes if QUANT_SCHEME_META in n.meta)
    assert schemes == ["dynamic_tensor"] * 2 + ["dynamic_token"] * 9
    tokens = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]  # solo: see above
    assert tokens == hf_greedy(model, NEW)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"weights.strategy": "block", "weights.block_structure": [64, 64]}, r"weights.block_structure \[64, 64\] is not supported"),
        ({"input_activations.strategy": "block"}, r"input_activations: strategy 'block' with dynamic True"),
        ({"input_activations.dynamic": "local"}, r"input_activations.dynamic 'local' is not supported"),
        ({"weights.dynamic": True}, r"weights: strategy 'channel' \(dynamic True\) is not supported"),
        ({"input_activations.num_bits": 4}, r"input_activations: type 'float' with num_bits 4"),
    ],
)  # fmt: skip
def test_bad_schemes_fail_at_load_naming_the_key(
    ct_tensor_dynamic: Path, tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    assert_edit_fails_at_load(ct_tensor_dynamic, tmp_path / "bad", edit, message)


def test_missing_weight_scale_fails_naming_the_tensor(ct_tensor_dynamic: Path, tmp_path: Path) -> None:
    tensors = checkpoint_tensors(ct_tensor_dynamic)
    folder = copy_checkpoint(ct_tensor_dynamic, tmp_path / "missing")
    del tensors["model.layers.1.self_attn.v_proj.weight_scale"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint.*model.layers.1.self_attn.v_proj.weight_scale"
    ):
        load_model(str(folder))


def test_modelopt_per_channel_per_token(tmp_path: Path) -> None:
    """ModelOpt FP8_PER_CHANNEL_PER_TOKEN (by hand in its layout: [N] weight scales, no input scales)."""
    folder = write_modelopt(tmp_path / "mo")
    tensors = {
        k: v
        for k, v in checkpoint_tensors(folder).items()
        if not k.endswith(("input_scale", "_proj.k_scale", "_proj.v_scale"))
    }
    for name, tensor in float_model().state_dict().items():
        if name.rsplit(".", 1)[0].endswith(LINEARS) and name.endswith(".weight"):
            q, scale = quantize_weight(tensor, "channel")
            tensors[name], tensors[name.replace(".weight", ".weight_scale")] = q, scale.reshape(-1)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "hf_quant_config.json").write_text(
        '{"quantization": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "exclude_modules": ["lm_head"]}}'
    )
    model = load_model(str(folder)).model
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 14 and all(m.input_scale is None and m.weight_scale.shape[1] == 1 for m in layers)
    assert {m.scheme.activations for m in layers} == {"dynamic_token"}
    fp8 = prompt_logits(model)
    assert rel_err(fp8, prompt_logits(dequantized_model(model, "token"))) < 1e-5
    assert 1e-4 < rel_err(fp8, prompt_logits(dequantized_model(model, None))) < 0.2


def test_compressed_tensors_kv_cache_scheme(ct_tensor_dynamic: Path, tmp_path: Path) -> None:
    """kv_cache_scheme (static per tensor): `self_attn.k_scale` / `v_scale` reach model.fxllm_kv_scales;
    one missing, or a dynamic KV scheme, fails at load naming it."""
    folder = copy_checkpoint(ct_tensor_dynamic, tmp_path / "kv")
    config = json.loads((folder / "config.json").read_text())
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    config["quantization_config"]["kv_cache_scheme"] = kv
    (folder / "config.json").write_text(json.dumps(config))
    tensors = checkpoint_tensors(folder)
    for layer in (0, 1):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor([0.04 + layer / 100])
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([0.03])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    scales = getattr(load_model(str(folder)).model, KV_SCALES_ATTR)
    assert [float(s) for s in scales[1]] == pytest.approx([0.05, 0.03])
    missing = copy_checkpoint(folder, tmp_path / "kv_missing")
    del tensors["model.layers.1.self_attn.k_scale"], tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Fp8CheckpointError, match=r"FP8 KV cache, but layers \[1\] have no k_scale"):
        load_model(str(missing))
    config["quantization_config"]["kv_cache_scheme"] = {**kv, "dynamic": True}
    (missing / "config.json").write_text(json.dumps(config))
    with pytest.raises(Fp8CheckpointError, match=r"kv_cache_scheme: strategy 'tensor' \(dynamic True\)"):
        load_model(str(missing))
