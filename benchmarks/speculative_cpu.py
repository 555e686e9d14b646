"""Speculative decoding on the CPU (issue 16): batch-1 decode tok/s with and without, in one process.

One SmolLM2 engine (float32); the speculator is switched per run (None = plain decoding, the n-gram
proposer, self-draft engines of a few draft_layers), runs interleaved prompt by prompt and repeated, so
the shared box's drift hits every mode alike. Prompts are input-grounded (rewrite / extract / edit a
given text or code). Greedy, so every mode must give the same tokens: mismatches are counted and, with
--equality, 32 prompts run batched and any difference is shown with the top-two logit margin (a near-tie
flipped by the other GEMM shapes of verification).

    python benchmarks/speculative_cpu.py --out /tmp/spec --self-draft-layers 2,4,8
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models import load_model
from fxllm.runtime.builder import build_engine
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.runtime.speculative.drafters import EngineDrafter, truncated_model

logger = logging.getLogger("speculative_cpu")

TEXT = (
    "The city council met on Tuesday to discuss the new budget. Council members agreed to increase funding "
    "for public parks by ten percent, while reducing spending on road maintenance. The mayor said the "
    "changes reflect what residents asked for during the spring listening sessions. A final vote is "
    "scheduled for next month, after a public hearing on the proposal."
)
CODE = """def average(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def largest(values):
    best = values[0]
    for value in values:
        if value > best:
            best = value
    return best
"""
PROMPTS = [
    f"Rewrite the following text in the past tense, keeping everything else the same:\n\n{TEXT}",
    f"Copy the following text, replacing 'council' with 'board':\n\n{TEXT}",
    f"Rename the variable 'values' to 'numbers' in this code and return the full code:\n\n{CODE}",
    f"Add type hints to this Python code and return the whole code:\n\n{CODE}",
    f"Extract every sentence of this text that mentions money:\n\n{TEXT}",
    f"Add a docstring to each function of this code:\n\n{CODE}",
    f"Repeat this text word for word, then give it a title:\n\n{TEXT}",
    f"Convert this Python code to use a while loop instead of for loops:\n\n{CODE}",
]


def chat(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)  # fmt: skip
    return list(ids)


def run_one(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float, Any]:
    """Greedy generation of one prompt alone: its tokens, decode tok/s (first to last token), metrics."""
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0]
    m = out.metrics
    tokens = out.outputs[0].token_ids
    seconds = m.finished_time - m.first_token_time
    return tokens, (len(tokens) - 1) / seconds if seconds > 0 else 0.0, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--k", type=int, default=4, help="speculative.num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--self-draft-layers", default="", help="comma-separated draft_layers values")
    parser.add_argument("--self-draft-prompts", type=int, default=4)
    parser.add_argument("--equality", action="store_true", help="also the 32-prompt batched greedy check")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        # On an oversubscribed box multi-threaded GEMMs with M > 1 wait for a second core (20 ms for a
        # 5 x 576 x 1536 linear at 2 threads vs 1.8 ms at 1), which hits verify steps, not 1-row decodes.
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    overrides = [f"model.model={args.model}", "model.dtype=float32", f"compile.backend={args.backend}",
                 "speculative.method=ngram", f"speculative.num_speculative_tokens={args.k}"]  # fmt: skip
    llm = LLM(overrides=overrides)
    engine = llm.engine
    ngram: SpeculativeDecoder = engine.speculator  # type: ignore[assignment]
    tokenizer = engine.tokenizer
    prompts = [chat(tokenizer, p) for p in PROMPTS[: args.prompts]]
    modes: dict[str, SpeculativeDecoder | None] = {"plain": None, "ngram": ngram}
    spec_config = ngram.config

    def switch(mode: str) -> None:
        engine.speculator = modes[mode]
        engine.kv_cache.reset_prefix_cache()  # every run prefills its prompt

    rates: dict[str, list[list[float]]] = {m: [[] for _ in prompts] for m in modes}
    tokens: dict[str, list[list[int]]] = {m: [[] for _ in prompts] for m in modes}
    accept: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for mode in modes if rep % 2 == 0 else reversed(list(modes)):
                switch(mode)
                toks, rate, m = run_one(llm, prompt, args.max_tokens)
                rates[mode][i].append(rate)
                tokens[mode][i] = toks
                if m.spec_draft_tokens:
                    accept[mode].append(m.spec_acceptance_rate)
                logger.info("rep %d prompt %d %s: %d tokens, %.1f tok/s, mean accepted length %s", rep, i, mode,
                            len(toks), rate, m.spec_mean_accepted_length)  # fmt: skip
    results: dict[str, Any] = {"model": args.model, "k": args.k, "max_tokens": args.max_tokens, "ngram": {}}
    ratios = [statistics.median(n) / statistics.median(p) for n, p in zip(rates["ngram"], rates["plain"])]
    results["ngram"] = {
        "plain_tok_s": [statistics.median(r) for r in rates["plain"]],
        "ngram_tok_s": [statistics.median(r) for r in rates["ngram"]],
        "speedup_per_prompt": ratios,
        "speedup_geomean": statistics.geometric_mean(ratios),
        "acceptance_mean": statistics.mean(accept["ngram"]) if accept["ngram"] else None,
        "token_mismatches": sum(a != b for a, b in zip(tokens["plain"], tokens["ngram"])),
    }
    print(f"n-gram k={args.k}: speed-up geomean {results['ngram']['speedup_geomean']:.2f}x, per prompt "
          + " ".join(f"{r:.2f}" for r in ratios) + f"; mismatches {results['ngram']['token_mismatches']}")  # fmt: skip

    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    layers = [int(x) for x in args.self_draft_layers.split(",") if x]
    if layers:
        hf = load_model(args.model)
        config = load_config(None, overrides[:3])
        sub = prompts[: args.self_draft_prompts]
        results["self_draft"] = {}
        for n in layers:
            draft_engine, _ = build_engine(config, model=truncated_model(hf.model, n), tokenizer=tokenizer)
            modes[f"self{n}"] = SpeculativeDecoder(spec_config, EngineDrafter(draft_engine))
            row: dict[str, list[float]] = {"plain": [], "self": [], "acceptance": [], "accepted_len": []}
            mismatches = 0
            for i, prompt in enumerate(sub):
                for mode in ("plain", f"self{n}"):
                    switch(mode)
                    toks, rate, m = run_one(llm, prompt, args.max_tokens)
                    row["plain" if mode == "plain" else "self"].append(rate)
                    if mode != "plain":
                        row["acceptance"].append(m.spec_acceptance_rate or 0.0)
                        row["accepted_len"].append(m.spec_mean_accepted_length or 1.0)
                        mismatches += toks != tokens["plain"][i]
            ratio = statistics.geometric_mean([s / p for s, p in zip(row["self"], row["plain"])])
            results["self_draft"][n] = {**row, "speedup_geomean": ratio, "token_mismatches": mismatches}
            print(f"self_draft draft_layers={n}: acceptance {statistics.mean(row['acceptance']):.2f}, mean accepted "
                  f"length {statistics.mean(row['accepted_len']):.2f}, speed {ratio:.2f}x, mismatches {mismatches}")  # fmt: skip
            del modes[f"self{n}"], draft_engine
            (out_dir / "results.json").write_text(json.dumps(results, indent=2))

    if args.equality:
        results["equality"] = equality_check(llm, tokenizer, args.max_tokens)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "self_draft"}, indent=1)[:3000])


def equality_check(llm: LLM, tokenizer: Any, max_tokens: int) -> dict[str, Any]:
    """32 prompts batched, plain vs n-gram (no batch limit): mismatching prompts with the top-2 margin."""
    engine = llm.engine
    spec = engine.speculator
    assert spec is not None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_engine import CHAT, RAW  # the engine tests' 32 prompts

    prompts = [tokenizer(p).input_ids for p in RAW] + [chat(tokenizer, q) for q in CHAT]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    engine.speculator = None
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    engine.speculator = spec
    spec.config.disable_batch_size = 0
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    hf = load_model("smollm2").model.float()
    diffs = []
    for i, (a, b) in enumerate(zip(plain, got)):
        if a == b:
            continue
        j = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        with torch.no_grad():
            logits = hf(torch.tensor([prompts[i] + a[:j]])).logits[0, -1]
        top = logits.topk(2).values
        diffs.append({"prompt": i, "position": j, "margin": float(top[0] - top[1])})
    drafted = spec.stats.draft_tokens
    print(f"equality: {32 - len(diffs)}/32 prompts identical; differences {diffs}; drafted {drafted} tokens")
    return {"identical": 32 - len(diffs), "differences": diffs, "drafted_tokens": drafted,
            "time": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


if __name__ == "__main__":
    main()
