"""SamplingParams: defaults, normalisation and validation at the API boundary."""

from __future__ import annotations

from typing import Any

import pytest

from fxllm.runtime.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k) == (1, 16, 0, 1.0, 1.0, 0)
    assert (p.min_p, p.seed, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (
        0.0,
        None,
        1.0,
        0.0,
        0.0,
    )
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 129),
        ("n", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("min_tokens", -1),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("seed", "7"),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", [""]),
        ("stop", [3]),
        ("stop", 3),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("ignore_eos", 1),
    ],
)
def test_bad_value_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    # Without a max_tokens the engine resolves the limit, so any min_tokens is accepted here.
    assert SamplingParams(max_tokens=None, min_tokens=500).min_tokens == 500


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 128},
        {"temperature": 0.0},
        {"top_p": 1e-9},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 50},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"max_tokens": None},
        {"seed": 0},
    ],
)
def test_edge_values_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_str_stop_becomes_list() -> None:
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=None).stop == []  # type: ignore[arg-type]
    assert SamplingParams(stop=["x", "yz"]).max_stop_len == 2


def test_from_dict() -> None:
    p = SamplingParams.from_dict({"temperature": 0, "stop": "END", "max_tokens": 5})
    assert p.is_greedy and p.stop == ["END"] and p.max_tokens == 5
    with pytest.raises(ValueError, match=r"unknown sampling field 'best_of'; known fields: n, max_tokens"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0})
