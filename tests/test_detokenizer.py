"""IncrementalDetokenizer with the real SmolLM2 tokenizer: streaming, multi-byte text, stop strings.

Both decoding paths run: the tokenizers library's DecodeStream (the fast tokenizer itself) and the
windowed decode kept for slow tokenizers (the same tokenizer behind a wrapper that hides the backend).
"""

from __future__ import annotations

import copy
import random
import string
from typing import Any

import pytest
from smollm2_tokenizer import smollm2_tokenizer

from fxllm.runtime.detokenizer import IncrementalDetokenizer, fast_backend, finish_reason_for_token
from fxllm.runtime.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! This is a plain ASCII sentence with numbers 12345.",
    "Emoji 😀🚀 and flags 🇫🇷, accents naïve café, Chinese 你好，世界！ Japanese こんにちは.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "数学：∑ₙ x² ≈ π/4 — “quotes” ‘single’ …",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(ids)


class WindowOnly:
    """A tokenizer that is not a fast one (no `_tokenizer`): the detokenizer uses its windowed decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)


@pytest.fixture(params=["decode_stream", "window"])
def decoder(request: pytest.FixtureRequest, tokenizer: Any) -> Any:
    """The tokenizer as the detokenizer sees it on each path."""
    return tokenizer if request.param == "decode_stream" else WindowOnly(tokenizer)


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
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode(
    tokenizer: Any,
    decoder: Any,
    prompt_ids: list[int],
    text: str,
    with_prompt: bool,
    skip_special_tokens: bool,
) -> None:
    # End-of-turn special tokens mid-output (two adjacent ones too) must come out as decode() gives them:
    # skipped, or written out with no space added between them.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*encode(tokenizer, text), im_end, *encode(tokenizer, " tail"), im_end, im_end]
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    det = IncrementalDetokenizer(decoder, prompt_ids if with_prompt else [], params)
    raw, safe = stream(det, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(raw) == expected
    assert "".join(safe) == expected
    assert det.text == expected
    assert det.uses_decode_stream == (decoder is tokenizer)


def test_multibyte_chars_never_emit_replacement_char(
    decoder: Any, tokenizer: Any, prompt_ids: list[int]
) -> None:
    text = "😀 世界 🚀🚀 naïve 你好"
    ids = encode(tokenizer, text)
    det = IncrementalDetokenizer(decoder, prompt_ids, SamplingParams())
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


def test_decode_stream_equals_window_decoder_token_by_token(tokenizer: Any) -> None:
    # Prompts cut at every token of the first dozen, so many end mid-character (the split emoji is the
    # case DecodeStream cannot start from); random ids with special tokens; both skip_special_tokens.
    rng = random.Random(0)
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    cases = []
    for text in [*TEXTS, "👨‍👩‍👧‍👦 family 🏳️‍🌈 ᚠᛇᚻ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        ids = encode(tokenizer, text)
        cases += [(ids[:cut], ids[cut:]) for cut in range(0, 12)]
    for _ in range(40):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
               for _ in range(30)]  # fmt: skip
        cases.append((ids[:5], ids[5:]))
    for skip in (True, False):
        params = SamplingParams(skip_special_tokens=skip)
        for prompt, out in cases:
            fast = IncrementalDetokenizer(tokenizer, prompt, params)
            window = IncrementalDetokenizer(WindowOnly(tokenizer), prompt, params)
            assert [fast.append(t) for t in out] == [window.append(t) for t in out], (prompt, out, skip)
            whole = tokenizer.decode(out, skip_special_tokens=skip)
            if "\ufffd" not in tokenizer.decode(prompt) + whole:  # no character split by the prompt's end
                assert fast.text == whole


def byte_fallback_tokenizer() -> Any:
    """A small SentencePiece-style tokenizer (Llama's decoders): other characters become <0xXX> tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *string.ascii_letters, *string.digits, *".,!?'", "▁H", "el", "lo"]:
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(vocab=vocab, merges=[("▁", "H"), ("e", "l"), ("l", "o")], unk_token="<unk>",
                       byte_fallback=True, fuse_unk=True)  # fmt: skip
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("path", ["decode_stream", "window"])
@pytest.mark.parametrize("prompt", ["", "Say"])
def test_byte_fallback_tokens(path: str, prompt: str) -> None:
    tok = byte_fallback_tokenizer()
    ids = tok.encode("Hello 你好 😀 world! </s> again", add_special_tokens=False)
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)  # the emoji is four byte tokens
    decoder = tok if path == "decode_stream" else WindowOnly(tok)
    det = IncrementalDetokenizer(decoder, tok.encode(prompt, add_special_tokens=False), SamplingParams())
    deltas = [det.append(t) for t in ids]
    assert det.uses_decode_stream == (path == "decode_stream")
    assert all("\ufffd" not in d for d in deltas) and "" in deltas
    # With a prompt, the first output token keeps the space the SentencePiece decoder strips at the start.
    expected = tok.decode(ids, skip_special_tokens=True)
    assert det.text == (expected if not prompt else " " + expected)


def test_window_decoder_takes_over_when_decode_stream_fails(tokenizer: Any, prompt_ids: list[int]) -> None:
    ids = encode(tokenizer, TEXTS[1])
    reference = IncrementalDetokenizer(WindowOnly(tokenizer), prompt_ids, SamplingParams())
    expected = [reference.append(t) for t in ids]
    det = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    deltas = [det.append(t) for t in ids[:7]]
    assert det.uses_decode_stream

    class Broken:
        def step(self, backend: Any, token_id: int) -> str:
            raise Exception("Invalid prefix encountered")  # what tokenizers raises (vllm#17448)

    det._stream = Broken()
    deltas += [det.append(t) for t in ids[7:]]
    assert not det.uses_decode_stream
    assert deltas == expected and det.text == TEXTS[1]


def test_fast_backend_only_for_the_libraries_own_decode(tokenizer: Any) -> None:
    assert fast_backend(tokenizer) is tokenizer._tokenizer
    assert fast_backend(WindowOnly(tokenizer)) is None

    class CustomDecode(type(tokenizer)):  # type: ignore[misc]
        def decode(self, token_ids: Any, **kwargs: Any) -> str:
            return "custom"

    custom = copy.copy(tokenizer)
    custom.__class__ = CustomDecode
    assert fast_backend(custom) is None  # its text would not be DecodeStream's
    det = IncrementalDetokenizer(custom, [], SamplingParams())
    det.append(encode(tokenizer, "hi")[0])
    assert not det.uses_decode_stream and det.text == ""  # "custom" minus "custom": the window decoder ran


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
