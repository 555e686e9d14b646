"""`fxllm eval-ppl MODEL [--text FILE]`: perplexity of a text under the served engine, with a sliding window.

The text is cut into windows of `--max-length` tokens that start `--stride` tokens apart (Hugging Face's
perplexity recipe): each window is one request with `prompt_logprobs=0`, and only the tokens that no
earlier window scored count, so every token but the first is scored once, with up to max_length - stride
tokens of context in front of it. Perplexity = exp(mean negative log-likelihood). Everything the config
sets applies (model.dtype, cache.dtype, quantization, ...), so one command compares them. The default
text is a few thousand tokens of real English that ships with Python: the reference topics of the
`pydoc_data` package (`help()`'s pages on the language), in sorted order.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024
DEFAULT_STRIDE = 512
DEFAULT_MAX_TOKENS = 4096


def default_text() -> str:
    """pydoc_data's topics (Python's language reference help pages), in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; every position 1..num_tokens-1 is scored once."""
    if not 0 < stride < max_length:  # stride == max_length would leave each window's first token unscored
        raise ValueError(f"the stride must be in [1, max_length={max_length}), got {stride}")
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the text has {num_tokens}")
    windows, scored_until = [], 1  # position 0 has no context: never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == num_tokens:
            break
    return windows


@dataclass
class PerplexityResult:
    """What one evaluation measured."""

    num_tokens: int  # tokens of the text (after --max-tokens)
    num_scored: int  # tokens whose logprob counted (all but the first)
    num_windows: int
    max_length: int
    stride: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    seconds: float

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.nll)


def perplexity(llm: Any, token_ids: list[int], max_length: int, stride: int) -> PerplexityResult:
    """Sliding-window perplexity of `token_ids` under `llm` (an fxllm.LLM); all windows run as one batch."""
    windows = sliding_windows(len(token_ids), max_length, stride)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate([token_ids[b:e] for b, e, _ in windows], params)
    seconds = time.perf_counter() - start
    total, count = 0.0, 0
    for (begin, end, first), out in zip(windows, outputs):
        entries = out.prompt_logprobs
        if entries is None:
            raise RuntimeError(f"request {out.request_id} returned no prompt logprobs")
        for position in range(first, end):
            total -= entries[position - begin][token_ids[position]].logprob
            count += 1
    return PerplexityResult(len(token_ids), count, len(windows), max_length, stride, total / count, seconds)


def _describe(config: Any, llm: Any) -> dict[str, str]:
    quantization = getattr(getattr(config, "quantization", None), "method", "none")
    return {"model": config.model.model, "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
            "cache.dtype": config.cache.dtype, "kv": str(llm.engine.runner.kv_caches[0].dtype).removeprefix("torch."),
            "quantization": str(quantization)}  # fmt: skip


def cmd_eval_ppl(args: argparse.Namespace, load: Callable[[argparse.Namespace, str | None], Any]) -> int:
    """Run `fxllm eval-ppl`: print one result line (and write --json)."""
    from fxllm.llm import LLM

    config = load(args, args.model)
    llm = LLM(config=config)
    if llm.tokenizer is None:
        raise SystemExit(f"{config.model.model} has no tokenizer: perplexity of a text needs one")
    text = Path(args.text).read_text() if args.text else default_text()
    ids = list(llm.tokenizer(text).input_ids)[: args.max_tokens]
    max_length = min(args.max_length, llm.engine.max_model_len - 1)  # a prompt leaves room for one token
    result = perplexity(llm, ids, max_length, min(args.stride, max_length - 1))
    described = _describe(config, llm)
    row = {**described, "text": args.text or "pydoc_data.topics", **asdict(result),
           "perplexity": result.perplexity}  # fmt: skip
    print(f"perplexity {result.perplexity:.4f} (NLL {result.nll:.5f} nats/token) over {result.num_scored} tokens "
          f"in {result.num_windows} windows of {result.max_length} (stride {result.stride}), {result.seconds:.1f} s; "
          + ", ".join(f"{k}={v}" for k, v in described.items()))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    llm.shutdown()
    return 0


def add_eval_ppl_parser(
    sub: Any,
    config_args: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace, str | None], Any],
) -> None:
    """Register `fxllm eval-ppl` on the CLI's subparsers."""
    p = sub.add_parser(
        "eval-ppl", help="perplexity of a text (default: Python's pydoc topics), sliding window"
    )
    p.add_argument("model", nargs="?", default=None, help="smollm2, a preset, a HF folder or a .gguf file")
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="score the first N tokens")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per window")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="tokens between window starts")
    p.add_argument("--json", help="also write the result here")
    config_args(p)
    p.set_defaults(fn=lambda args: cmd_eval_ppl(args, load))
