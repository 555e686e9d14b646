"""FP8 checkpoints served as stored: compressed-tensors (written by the `compressed-tensors` package itself,
channel weights + dynamic per-token activations, and tensor weights + static input scales) and ModelOpt
(hf_quant_config.json, written by hand in its layout: scalar per-tensor weight_scale / input_scale,
`self_attn.k_proj.k_scale` / `v_proj.v_scale`), all from tiny-llama's random weights.

What is checked: the loaded linears hold the checkpoint's e4m3 bytes and scales (never a float copy); the
eager FP8 model equals the dequantized float model with the same activation quantization (tolerance 1e-5
for summation order; measured 0.0); against the plain dequantized float model the only difference is
e4m3 activations: 3 mantissa bits give each GEMM input ~3% RMS relative error, which tiny-llama's eight
GEMMs deep compound to a measured 0.093-0.094 relative logit error, so the bound is 0.2 (a misplaced
scale or weight is an O(1) error) and 1e-4 below (zero would mean the activations were not quantized);
`LLM(path)` with no flag generates the eager FP8 model's greedy tokens; the compiled graph's
GEMMs are FP8 with q/k/v and gate/up merged; unsupported schemes and missing scales fail at load naming
the key or tensor.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from fp8_checkpoint_layouts import (
    LINEARS,
    PROMPTS,
    assert_edit_fails_at_load,
    checkpoint_tensors,
    copy_checkpoint,
    dequantized_model,
    hf_greedy,
    prompt_logits,
    rel_err,
    write_block,
    write_compressed_tensors,
    write_modelopt,
)
from safetensors.torch import save_file

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.ops.kv_quant import KV_SCALES_ATTR
from fxllm.quantization.checkpoint import Fp8CheckpointError
from fxllm.quantization.checkpoint_modules import Fp8Linear
from fxllm.quantization.fp8 import FP8_DTYPE
from fxllm.runtime.sampling_params import SamplingParams

pytest.importorskip("compressed_tensors")

NEW = 8
GREEDY = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0)
BASE = ["compile.backend=eager", "cache.num_blocks=32"]


@pytest.fixture(scope="module")
def ct_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_compressed_tensors(tmp_path_factory.mktemp("ct_channel"), "FP8_DYNAMIC")


@pytest.fixture(scope="module")
def ct_static(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_compressed_tensors(tmp_path_factory.mktemp("ct_static"), "FP8")


@pytest.fixture(scope="module")
def ct_block(tmp_path_factory: pytest.TempPathFactory, ct_channel: Path) -> Path:
    return write_block(tmp_path_factory.mktemp("ct_block") / "folder", ct_channel)


@pytest.fixture(scope="module")
def modelopt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_modelopt(tmp_path_factory.mktemp("modelopt"))


@pytest.mark.parametrize("layout", ["ct_channel", "ct_static", "ct_block", "modelopt"])
def test_loaded_fp8_checkpoint_matches_its_dequantized_model(
    layout: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(layout)
    model = load_model(str(folder)).model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(layers) == 2 * len(LINEARS) and isinstance(model.lm_head, torch.nn.Linear)  # lm_head ignored
    stored = checkpoint_tensors(folder)
    for name, layer in layers.items():
        assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.weight.view(torch.uint8), stored[f"{name}.weight"].view(torch.uint8))
        assert torch.equal(layer.weight_scale.flatten(), stored[f"{name}.weight_scale"].float().flatten())
        assert (layer.input_scale is None) == (layout in ("ct_channel", "ct_block"))
        n, k = layer.out_features, layer.in_features
        shapes = {"ct_channel": (n, 1), "ct_block": (-(-n // 128), -(-k // 128))}
        assert tuple(layer.weight_scale.shape) == shapes.get(layout, (1,))
    fp8 = prompt_logits(model)
    assert rel_err(fp8, prompt_logits(dequantized_model(model, "token"))) < 1e-5
    err = rel_err(fp8, prompt_logits(dequantized_model(model, None)))
    assert 1e-4 < err < 0.2, err
    layer = layers["model.layers.0.self_attn.q_proj"]
    model.to(torch.bfloat16)  # Module.to casts floating tensors: an FP8 layer's weight and scales must not
    assert (layer.weight.dtype, layer.weight_scale.dtype, layer.dtype) == (
        FP8_DTYPE,
        torch.float32,
        torch.bfloat16,
    )


@pytest.mark.parametrize("layout", ["ct_channel", "modelopt"])
def test_llm_serves_the_checkpoint_as_stored(
    layout: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    folder: Path = request.getfixturevalue(layout)
    llm = LLM(str(folder), config=load_config(None, BASE))  # no quantization flag: the config says FP8
    gm = llm.engine.runner.graph_module
    assert sum(p.dtype == FP8_DTYPE for p in gm.parameters()) == 8  # merged qkv, o, gate_up, down x 2 layers
    float_matrices = {
        n for n, p in gm.named_parameters() if p.dtype != FP8_DTYPE and p.dim() == 2 and p.shape[1] > 1
    }
    assert float_matrices == {"model.model.embed_tokens.weight", "model.lm_head.weight"}  # no float copy
    tokens = [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert tokens == hf_greedy(load_model(str(folder)).model, NEW)


def test_block_scale_checkpoint_merges_and_serves(ct_block: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    llm = LLM(str(ct_block), config=load_config(None, BASE))
    params = dict(llm.engine.runner.graph_module.named_parameters())
    shapes = sorted((tuple(p.shape), tuple(params[f"{n}_scale"].shape)) for n, p in params.items() if "merged" in n
                    and p.dtype == FP8_DTYPE)  # fmt: skip
    # gate/up (N = 256, whole blocks) merge with block scales. q, k, v have one block each (N <= 128, K = 128):
    # a [1, 1] block scale is a tensor scale, so they merge as per-tensor members do, into [N, 1] scales.
    assert shapes == [((256, 128), (256, 1))] * 2 + [((512, 128), (4, 1))] * 2
    tokens = [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert tokens == hf_greedy(load_model(str(ct_block)).model, NEW)


def test_fp8_checkpoint_warm_start_from_the_compile_cache(
    modelopt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(tmp_path / "fxllm-cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    cold = LLM(str(modelopt), config=load_config(None, BASE))
    warm = LLM(str(modelopt), config=load_config(None, BASE))
    assert cold.build_info.compile_cache.startswith("miss") and warm.build_info.compile_cache == "hit"
    cold_w = dict(cold.engine.runner.graph_module.named_parameters())
    warm_w = dict(warm.engine.runner.graph_module.named_parameters())
    assert sorted(cold_w) == sorted(warm_w)
    for name, tensor in cold_w.items():  # merged e4m3 weights and per-channel scales rebuilt bit for bit
        assert torch.equal(tensor.view(torch.uint8), warm_w[name].view(torch.uint8))
    tokens = [[out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)] for llm in (cold, warm)]
    assert tokens[0] == tokens[1]


def test_static_tensor_activations_use_the_checkpoint_scales(
    ct_static: Path, ct_channel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    static = [*BASE, "quantization.activation_scheme=static_tensor"]
    llm = LLM(str(ct_static), config=load_config(None, static))
    tokens = [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]
    assert tokens == hf_greedy(load_model(str(ct_static)).model, NEW)
    with pytest.raises(Exception, match=r"static_tensor: 14 FP8 layer.*no input_scale"):
        LLM(str(ct_channel), config=load_config(None, static))
    # method fp8 on top: nothing float is left to quantize but the excluded LM head, so the same tokens;
    # without the exclusion the LM head would need an input scale it does not have.
    on_top = LLM(str(ct_static), config=load_config(None, [*static, "quantization.method=fp8"]))
    assert [out.outputs[0].token_ids for out in on_top.generate(PROMPTS, GREEDY)] == tokens
    with pytest.raises(
        Exception, match=r"static_tensor needs calibrated input scales.*'model.lm_head.weight'"
    ):
        LLM(
            str(ct_static),
            config=load_config(None, [*static, "quantization.method=fp8", "quantization.exclude=[]"]),
        )


def test_modelopt_kv_scales_reach_the_fp8_cache(modelopt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(str(modelopt)).model
    scales = getattr(model, KV_SCALES_ATTR)
    assert sorted(scales) == [0, 1]
    assert [float(s) for s in scales[1]] == pytest.approx([0.06, 0.03])
    monkeypatch.setenv("FXLLM_NO_COMPILE_CACHE", "1")
    llm = LLM(str(modelopt), config=load_config(None, [*BASE, "cache.dtype=fp8"]))
    attrs = {n: p for n, p in [*llm.engine.runner.graph_module.named_buffers()] if n.startswith("kv_scale_")}
    attrs.update(
        {n: p for n, p in llm.engine.runner.graph_module.named_parameters() if n.startswith("kv_scale_")}
    )
    assert float(attrs["kv_scale_1_k"]) == pytest.approx(0.06) and float(
        attrs["kv_scale_0_v"]
    ) == pytest.approx(0.02)
    assert len(llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids) == NEW


def test_compile_explain_lists_the_checkpoint_fp8_gemms(ct_channel: Path) -> None:
    from fxllm.serve.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compile", str(ct_channel), "--explain", "--backend", "eager"]) == 0
    rows = [line for line in out.getvalue().splitlines() if re.match(r"\s+fp8_\w+_default(_\d+)?\s", line)]
    assert len(rows) == 8, out.getvalue()  # one row per FP8 GEMM: merged qkv, o, gate_up, down x 2 layers


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"input_activations.strategy": "group", "input_activations.group_size": 128}, r"input_activations: strategy 'group'"),
        ({"weights.type": "int"}, r"weights: type 'int' with num_bits 8 is not supported"),
        ({"weights.strategy": "group"}, r"weights: strategy 'group'"),
    ],
)  # fmt: skip
def test_unsupported_compressed_tensors_schemes_fail_at_load(
    ct_channel: Path, tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    assert_edit_fails_at_load(ct_channel, tmp_path / "bad", edit, message)


def test_bad_fp8_tensors_fail_at_load_naming_the_tensor(modelopt: Path, tmp_path: Path) -> None:
    tensors = checkpoint_tensors(modelopt)
    missing = copy_checkpoint(modelopt, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.input_scale"},
              str(missing / "model.safetensors"))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint.*model.layers.1.mlp.up_proj.input_scale"
    ):
        load_model(str(missing))
    wrong = copy_checkpoint(modelopt, tmp_path / "wrong")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors[
        "model.layers.0.self_attn.q_proj.weight"
    ].float()
    save_file(tensors, str(wrong / "model.safetensors"))
    with pytest.raises(
        Fp8CheckpointError, match=r"'model.layers.0.self_attn.q_proj.weight' is torch.float32"
    ):
        load_model(str(wrong))
    gptq = copy_checkpoint(modelopt, tmp_path / "gptq")
    (gptq / "hf_quant_config.json").unlink()
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(Fp8CheckpointError, match=r"quant_method 'gptq' is not supported"):
        load_model(str(gptq))
    nvfp4 = copy_checkpoint(modelopt, tmp_path / "nvfp4")
    (nvfp4 / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(Fp8CheckpointError, match=r"quant_algo 'NVFP4' is not supported"):
        load_model(str(nvfp4))
