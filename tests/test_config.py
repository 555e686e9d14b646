"""config.yml: the example in the repo loads, overrides apply, unknown keys are named."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fxllm.config import FxllmConfig, config_from_dict, load_config
from fxllm.dtypes import parse_dtype
from fxllm.models.loader import resolve_dtype
from fxllm.runtime.engine import resolve_device_dtype

REPO = Path(__file__).resolve().parents[1]


def test_example_config_equals_defaults() -> None:
    assert load_config(REPO / "config.yml") == FxllmConfig()


def test_overrides_parse_yaml_values() -> None:
    config = load_config(None, ["scheduler.max_num_seqs=8", "cache.enable_prefix_caching=false"])
    assert config.scheduler.max_num_seqs == 8
    assert config.cache.enable_prefix_caching is False


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown key scheduler\.max_num_seq;"):
        config_from_dict({"scheduler": {"max_num_seq": 3}})


def test_pass_config_is_validated() -> None:
    config = config_from_dict(
        {"compile": {"passes": {"merge_linears": False, "match_rope": {"enabled": True}}}}
    )
    assert config.compile.passes["merge_linears"].enabled is False
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"compile": {"passes": {"match_rope": {"enable": True}}}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cache.block_size=abc", "cache.block_size must be int, got str 'abc'"),
        ("cache.block_size=1.5", "cache.block_size must be int, got float 1.5"),
        ("scheduler.max_num_seqs=true", r"scheduler.max_num_seqs must be int \| None, got bool True"),
        ("cache.enable_prefix_caching=maybe", "cache.enable_prefix_caching must be bool, got str 'maybe'"),
        ("cache.gpu_memory_fraction=most", "cache.gpu_memory_fraction must be float"),
        ("model.max_model_len=long", r"model.max_model_len must be int \| None"),
        (
            "compile.cuda_graph_batch_sizes=[1, a]",
            r"compile.cuda_graph_batch_sizes must be list\[int\].*\[1\]",
        ),
        (
            "compile.op_backends={rms_norm: 3}",
            r"compile.op_backends must be dict\[str, str\].*\['rms_norm'\]",
        ),
        ("compile.plugins=my_plugin", r"compile.plugins must be list\[str\], got str 'my_plugin'"),
        ("model.dtype=int8", "model.dtype: unknown dtype 'int8'; use one of auto, float32, fp32"),
    ],
)
def test_override_of_the_wrong_type_names_key_and_type(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_yaml_file_of_the_wrong_type_names_key_and_type(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    cases = {
        "cache:\n  block_size: abc\n": "cache.block_size must be int, got str 'abc'",
        "cache:\n  cpu_kv_bytes: 1.5e+8\n": "cache.cpu_kv_bytes must be int, got float 150000000.0",
        'compile:\n  cuda_graph_batch_sizes: [1, "2"]\n': r"cuda_graph_batch_sizes must be list\[int\]",
        'server:\n  port: "8000"\n': "server.port must be int, got str '8000'",
        "model:\n  model: 7\n": "model.model must be str, got int 7",
        "cache: 0\n": "cache must be a mapping",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(path)


def test_accepted_values_keep_their_meaning() -> None:
    config = load_config(None, [
        "model.max_model_len=null",  # int | None takes None
        "cache.gpu_memory_fraction=1",  # a float field takes an int, as a float
        "cache.enable_prefix_caching=no",  # YAML's own booleans stay booleans
        "compile.cuda_graph_batch_sizes=[1, 2]",
        "compile.op_backends.rms_norm=torch",
        "server.api_key=0123",  # a str field keeps the text: YAML would read the int 83
        "model.dtype=BF16",
    ])  # fmt: skip
    assert config.model.max_model_len is None
    assert config.cache.gpu_memory_fraction == 1.0 and isinstance(config.cache.gpu_memory_fraction, float)
    assert config.cache.enable_prefix_caching is False
    assert config.compile.cuda_graph_batch_sizes == [1, 2]
    assert config.compile.op_backends == {"rms_norm": "torch"}
    assert config.server.api_key == "0123"
    assert config.model.dtype == "BF16"


def test_fxllm_serve_fails_fast_on_a_mistyped_override(caplog: pytest.LogCaptureFixture) -> None:
    from fxllm.serve.serve_cli import build_parser, config_from_args, serve_main

    args = build_parser().parse_args(["tiny-llama", "--set", "cache.block_size=abc"])
    with pytest.raises(ValueError, match=r"cache\.block_size must be int, got str 'abc'"):
        config_from_args(args)
    # The server's entry point reports it and exits 2 before it loads any model.
    with caplog.at_level(logging.ERROR):
        assert serve_main(["tiny-llama", "--set", "cache.block_size=abc"]) == 2
    assert "cache.block_size must be int" in caplog.text


def test_one_dtype_parser_for_engine_loader_and_config() -> None:
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.Float16") is torch.float16 and parse_dtype(" fp32 ") is torch.float32
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype("cpu", "AUTO") == (torch.device("cpu"), torch.float32)
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is None
    for bad in ("int8", "float64", "bfloat"):
        with pytest.raises(ValueError, match=f"unknown dtype '{bad}'; use one of .*bf16.*fp16"):
            resolve_device_dtype("cpu", bad)
        with pytest.raises(ValueError, match="use one of auto, float32"):
            resolve_dtype(bad, torch.device("cpu"))
    with pytest.raises(
        ValueError, match="use one of float32, fp32, float, bfloat16, bf16, float16, fp16, half"
    ):
        parse_dtype("auto")
