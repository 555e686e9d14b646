"""`fxllm eval-ppl`: sliding windows score every token once; the perplexity equals Hugging Face's for the
same windows (float32, tiny-llama: exp of a mean of per-token logprobs that match to ~1e-6, so 1e-4 relative).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.serve.cli import build_parser
from fxllm.serve.eval_ppl import default_text, perplexity, sliding_windows


def test_windows_score_every_token_once() -> None:
    for n, length, stride in ((10, 4, 2), (100, 16, 15), (37, 16, 5), (5, 16, 8)):
        scored = [p for _, end, first in sliding_windows(n, length, stride) for p in range(first, end)]
        assert scored == list(range(1, n)), (n, length, stride)
        assert all(end - begin <= length for begin, end, _ in sliding_windows(n, length, stride))
    for stride in (0, 4, 5):  # a stride of max_length would leave each window's first token unscored
        with pytest.raises(ValueError, match="stride"):
            sliding_windows(10, 4, stride)


def test_default_text_is_real_english() -> None:
    text = default_text()
    assert len(text) > 20_000 and " the " in text and "assert" in text


def test_perplexity_matches_hf_on_the_same_windows() -> None:
    hf = load_model("tiny-llama").model
    ids = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(9)).tolist()
    llm = LLM(copy.deepcopy(hf), config=load_config(None, ["compile.backend=eager"]))
    result = perplexity(llm, ids, max_length=32, stride=16)
    assert result.num_scored == len(ids) - 1 and result.num_windows == 4
    nll = 0.0
    with torch.no_grad():
        for begin, end, first in sliding_windows(len(ids), 32, 16):
            logprobs = torch.log_softmax(hf(torch.tensor([ids[begin:end]])).logits[0].float(), dim=-1)
            nll -= sum(float(logprobs[p - begin - 1, ids[p]]) for p in range(first, end))
    expected = math.exp(nll / (len(ids) - 1))
    assert result.perplexity == pytest.approx(expected, rel=1e-4)


def test_cli_registers_eval_ppl() -> None:
    args = build_parser().parse_args(
        ["eval-ppl", "tiny-llama", "--max-length", "64", "--set", "cache.dtype=fp8"]
    )
    assert args.model == "tiny-llama" and args.max_length == 64 and args.set == ["cache.dtype=fp8"]
