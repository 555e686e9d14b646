"""config.yml: the example in the repo loads, overrides apply, unknown keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxllm.config import FxllmConfig, config_from_dict, load_config

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
