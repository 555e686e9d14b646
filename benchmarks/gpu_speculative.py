"""Speculative decoding's machinery on one GPU, 8B preset, random weights (issue 16's H100 done-means).

Usage (GPU machine, repo root; about 5-6 minutes on one H100 from a cold compile cache, --max-seconds caps it):
    PYTHONPATH=. python3 benchmarks/gpu_speculative.py --out $OUT
    PYTHONPATH=. python3 benchmarks/gpu_speculative.py --smoke --out /tmp/spec_smoke   # tiny-llama, CPU

Section "oracle": with random weights acceptance means nothing, so the model's greedy output is forced
(oracle.force_chain_: random weights everywhere the cost is, the next token t + 1 with a logit margin of ~59
against bf16 rounding of ~0.25) and the oracle drafts t + 1, t + 2, ... from each sequence's own last token
(oracle.ChainOracle). Every draft should be accepted (`acceptance` and `forced` report what was reached:
`forced` = fraction of output tokens equal to the chain). Drafting the plain run's tokens instead (the old
OracleProposer) lost the path on bf16 near-ties after a few steps. Per batch size (default 1 and 32) and k
(default 1, 2, 4, 8): tok/s against plain decoding (async scheduling on, the GPU default, and off) and
`step_vs_decode`: ms per speculative step (all verify steps of 1 + k tokens per sequence, on their CUDA
graphs) against a plain synchronous decode step (CUDA graph), host work included; `verify_vs_decode`: the
verify bucket's graph replay (batch x (1 + k) tokens) against the decode bucket's (batch tokens), device time
of the forward alone (20 replays, inputs as the runs left them). Ideal tok/s gain at batch 1: ~(k + 1)x.

Section "eagle3": the same forced model, its graph returning the hidden states the head reads, with a
random-weight EAGLE-3 head in the public layout: runs end to end with the decode and verify CUDA graphs
(replay counters) and must give the chain's tokens (`forced` 1.0: verification decides every token);
acceptance ~0 (a random head), the head's time per step reported.

Writes speculative.json (both sections, rewritten after every row) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_speculative_common import (
    base_overrides,
    build_llm,
    plain_runs,
    release,
    run_greedy,
    timed,
    warm,
)
from fxllm.models import load_model
from fxllm.runtime.speculative.decoder import SpeculativeDecoder
from fxllm.runtime.speculative.oracle import ChainOracle, force_chain_, forced_next
from fxllm.serve.bench_offline import random_prompts

logger = logging.getLogger("fxllm.gpu.speculative")
# Both engines live at once until the first is freed: each takes a share of the free memory for its KV pool.
MEMORY_FRACTION = 0.4


def forced_model(smoke: bool) -> tuple[torch.nn.Module, int]:
    """The preset with random weights, made to predict forced_next greedily (oracle.force_chain_)."""
    name, device, dtype = (
        ("tiny-llama", "cpu", torch.float32) if smoke else ("llama-3.1-8b", "cuda", torch.bfloat16)
    )
    model = load_model(name, device=device, dtype=dtype).model
    return model, force_chain_(model)


def forced_fraction(prompts: list[list[int]], outputs: list[list[int]], vocab: int) -> float:
    """Fraction of output tokens that follow the forced chain from the previous token."""
    good = total = 0
    for prompt, out in zip(prompts, outputs):
        previous = prompt[-1]
        for token in out:
            good += token == forced_next(previous, vocab)
            total += 1
            previous = token
    return good / max(total, 1)


def replay_ms(llm: Any, size: int, query_len: int, repeats: int = 20) -> float | None:
    """Mean ms of one replay of the bucket (size, query_len), its static inputs as the last run left them (real
    block tables and context lengths of ~input + output tokens; it rewrites the same K/V into the same slots)."""
    graphs = llm.engine.runner.decode_graphs
    if graphs is None:
        return None
    pool = graphs.buckets if query_len == 1 else graphs.verify_buckets
    bucket = next((b for b in pool if b.size == size and b.query_len == query_len), None)
    if bucket is None:
        return None
    cuda = llm.engine.runner.device.type == "cuda"
    with torch.inference_mode():
        graphs._replay(bucket)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            graphs._replay(bucket)
        if cuda:
            torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def spec_overrides(args: argparse.Namespace, method: str, k: int, extra: list[str]) -> list[str]:
    """Speculation always on (no auto switch, no backoff) with buckets for the measured batch sizes."""
    sizes = ",".join(args.batches.split(","))
    return [*base_overrides(args.smoke, MEMORY_FRACTION), f"compile.cuda_graph_batch_sizes=[{sizes}]",
            f"speculative.method={method}", f"speculative.num_speculative_tokens={k}",
            "speculative.disable_batch_size=0", "speculative.min_acceptance_rate=0", "speculative.auto_disable=off",
            *extra, *args.set]  # fmt: skip


def oracle_section(
    args: argparse.Namespace, results: dict[str, Any], save: Any, start: float
) -> list[dict[str, Any]]:
    """Plain against chain-oracle speculation at each batch size and k, one engine (verify buckets up to max k)."""
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    model, vocab = forced_model(args.smoke)
    # method ngram only to get the verify buckets built; the proposer is swapped for the oracle below
    overrides = spec_overrides(args, "ngram", max(ks), [])
    llm = build_llm(overrides, model, batches, args.smoke)
    del model
    engine = llm.engine
    assert engine.speculator is not None
    spec_config = engine.speculator.config
    graphs = engine.runner.decode_graphs
    section: dict[str, Any] = {"config": overrides, "build_seconds": time.perf_counter() - start, "rows": [],
                               "verify_buckets": [(b.size, b.query_len) for b in graphs.verify_buckets] if graphs else []}  # fmt: skip
    results["oracle"] = section
    logger.info(
        "oracle engine built in %.1f s; verify buckets %s",
        section["build_seconds"],
        section["verify_buckets"],
    )
    table = []
    oracle = ChainOracle(vocab)
    for batch in batches:
        prompts = random_prompts(batch, args.input_len, vocab, 7 + batch)
        warm(llm, prompts[0])
        plain, want = plain_runs(llm, prompts, args.output_len)
        plain["forced"] = forced_fraction(prompts, want, vocab)
        for k in ks:
            modes = ("verify_graphs", "no_verify_graphs") if args.both_modes else ("verify_graphs",)
            for mode in modes:
                if time.perf_counter() - start > args.oracle_seconds:
                    section["cut_short"] = f"stopped before batch {batch} k {k} {mode}"
                    logger.warning(
                        "--oracle-seconds %.0f reached: %s", args.oracle_seconds, section["cut_short"]
                    )
                    break
                spec_config.num_speculative_tokens = k
                hidden = graphs.verify_buckets if graphs is not None and mode == "no_verify_graphs" else None
                if hidden is not None and graphs is not None:
                    graphs.verify_buckets = []
                engine.speculator = SpeculativeDecoder(spec_config, oracle)
                try:
                    row, got = run_greedy(llm, prompts, args.output_len)
                finally:
                    engine.speculator = None
                    if hidden is not None and graphs is not None:
                        graphs.verify_buckets = hidden
                decode_ms, verify_ms = replay_ms(llm, batch, 1), replay_ms(llm, batch, 1 + k)
                row.update(
                    decode_replay_ms=decode_ms, verify_replay_ms=verify_ms,
                    verify_vs_decode=verify_ms / decode_ms if decode_ms and verify_ms else None,
                    batch=batch, k=k, mode=mode, plain=plain, forced=forced_fraction(prompts, got, vocab),
                    same_tokens=sum(a == b for a, b in zip(got, want)) / len(want),
                    vs_async=row["output_tok_s"] / plain["async_on"]["output_tok_s"],
                    vs_sync=row["output_tok_s"] / plain["async_off"]["output_tok_s"],
                    step_vs_decode=row["ms_per_step"] / plain["async_off"]["ms_per_step"],
                )  # fmt: skip
                section["rows"].append(row)
                table.append(row)
                save()
                logger.info("oracle batch %d k %d %s: %.1f tok/s (%.2fx async plain), acceptance %s, graphs %s",
                            batch, k, mode, row["output_tok_s"], row["vs_async"], row["acceptance"], row["graphs"])  # fmt: skip
    llm.shutdown()
    return table


def eagle3_section(
    args: argparse.Namespace, results: dict[str, Any], save: Any, start: float
) -> list[dict[str, Any]]:
    """The forced model with a random EAGLE-3 head (decode / verify CUDA graphs): tokens, acceptance, head time."""
    from fxllm.models.presets import preset_config
    from fxllm.runtime.speculative.eagle3_head import write_random_head

    ks = [int(k) for k in args.eagle3_ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    section_start = time.perf_counter()
    model, vocab = forced_model(args.smoke)
    name = "tiny-llama" if args.smoke else "llama-3.1-8b"
    folder = Path(tempfile.mkdtemp(prefix="eagle3-head-"))
    target_config = preset_config(name)
    head = write_random_head(folder, target_config, draft_vocab_size=min(32000, int(target_config.vocab_size)),
                             dtype=torch.float32 if args.smoke else torch.bfloat16)  # fmt: skip
    overrides = spec_overrides(args, "eagle3", max(ks), [f"speculative.model={head}"])
    llm = build_llm(overrides, model, batches, args.smoke)
    del model
    engine = llm.engine
    speculator = engine.speculator
    assert speculator is not None
    proposer = speculator.proposer
    totals: dict[str, float] = {}
    timed(proposer, "before_step", totals)
    timed(proposer, "propose", totals)
    section: dict[str, Any] = {
        "config": overrides,
        "build_seconds": time.perf_counter() - section_start,
        "rows": [],
        "head_attention": str(getattr(proposer, "attention", None)),
    }
    results["eagle3"] = section
    table = []
    for batch in batches:
        prompts = random_prompts(batch, args.input_len, vocab, 7 + batch)
        warm(llm, prompts[0])
        plain, want = plain_runs(llm, prompts, args.eagle3_output_len)
        for k in ks:
            if time.perf_counter() - start > args.max_seconds:
                section["cut_short"] = f"stopped before batch {batch} k {k}"
                logger.warning("--max-seconds %.0f reached: %s", args.max_seconds, section["cut_short"])
                break
            speculator.config.num_speculative_tokens = k
            engine.speculator = speculator
            speculator.reset_stats()
            totals.clear()
            caught0, drafts0 = proposer.num_caught_up, proposer.num_draft_steps  # type: ignore[attr-defined]
            row, got = run_greedy(llm, prompts, args.eagle3_output_len)
            engine.speculator = None
            steps = row["steps"]
            row.update(
                batch=batch, k=k, mode="eagle3", plain=plain, forced=forced_fraction(prompts, got, vocab),
                same_tokens=sum(a == b for a, b in zip(got, want)) / len(want),
                vs_async=row["output_tok_s"] / plain["async_on"]["output_tok_s"],
                vs_sync=row["output_tok_s"] / plain["async_off"]["output_tok_s"],
                step_vs_decode=row["ms_per_step"] / plain["async_off"]["ms_per_step"],
                head_catch_up_ms_per_step=1e3 * totals.get("before_step", 0.0) / steps,
                head_draft_ms_per_step=1e3 * totals.get("propose", 0.0) / steps,
                head_rows=proposer.num_caught_up - caught0,  # type: ignore[attr-defined]
                head_draft_forwards=proposer.num_draft_steps - drafts0,  # type: ignore[attr-defined]
            )  # fmt: skip
            section["rows"].append(row)
            table.append(row)
            save()
            logger.info("eagle3 batch %d k %d: %.1f tok/s, acceptance %s, forced %.2f, head %.2f + %.2f ms/step, "
                        "graphs %s", batch, k, row["output_tok_s"], row["acceptance"], row["forced"],
                        row["head_catch_up_ms_per_step"], row["head_draft_ms_per_step"], row["graphs"])  # fmt: skip
    llm.shutdown()
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    """One line per speculative run."""
    print(f"{'section':>7} {'batch':>5} {'k':>2} {'verify graphs':>13} {'tok/s':>9} {'plain':>9} {'x async':>7} "
          f"{'x sync':>6} {'accept':>6} {'forced':>6} {'same':>5} {'ms/step':>7} {'step/decode':>11} "
          f"{'replays':>7} {'head ms':>7} {'verify/decode graph':>19}")  # fmt: skip
    for r in table:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        section = "eagle3" if r["mode"] == "eagle3" else "oracle"
        graphs = "off" if r["mode"] == "no_verify_graphs" else "on"
        replays = r["graphs"].get("num_verify_replays", 0) + r["graphs"].get("num_replays", 0)
        head = r.get("head_catch_up_ms_per_step", 0.0) + r.get("head_draft_ms_per_step", 0.0)
        ratio = r.get("verify_vs_decode")
        graph = (
            "-" if ratio is None else f"{r['verify_replay_ms']:.2f}/{r['decode_replay_ms']:.2f} {ratio:.2f}"
        )
        print(f"{section:>7} {r['batch']:>5} {r['k']:>2} {graphs:>13} {r['output_tok_s']:>9.1f} "
              f"{r['plain']['async_on']['output_tok_s']:>9.1f} {r['vs_async']:>7.2f} {r['vs_sync']:>6.2f} {acc:>6} "
              f"{r['forced']:>6.2f} {r['same_tokens']:>5.2f} {r['ms_per_step']:>7.2f} {r['step_vs_decode']:>11.2f} "
              f"{replays:>7} {head:>7.2f} {graph:>19}")  # fmt: skip


def main() -> int:
    """The oracle section, then the EAGLE-3 section; JSON to --out, a table on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--ks", default="1,2,4,8", help="oracle drafts per step")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--both-modes", action="store_true", help="also run each k with the verify graphs hidden"
    )
    parser.add_argument("--eagle3-ks", default="4")
    parser.add_argument("--eagle3-output-len", type=int, default=64)
    parser.add_argument("--sections", default="oracle,eagle3")
    parser.add_argument(
        "--smoke", "--cpu-check", action="store_true", help="tiny-llama on the CPU (checks the script)"
    )
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument(
        "--oracle-seconds", type=float, default=240.0, help="no new oracle run after this (total)"
    )
    parser.add_argument("--max-seconds", type=float, default=450.0, help="no new run after this (total)")
    parser.add_argument(
        "--eagle3", action="store_true", help="old form: --sections eagle3 with --ks / --output-len"
    )
    args = parser.parse_args()
    if args.eagle3:
        args.sections, args.eagle3_ks, args.eagle3_output_len = "eagle3", args.ks, args.output_len
    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    out_file = Path(args.out) / "speculative.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"argv": vars(args), "input_len": args.input_len, "output_len": args.output_len}
    if torch.cuda.is_available() and not args.smoke:
        results["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        results["seconds"] = time.perf_counter() - start
        out_file.write_text(json.dumps(results, indent=1))

    table: list[dict[str, Any]] = []
    sections = args.sections.split(",")
    if "oracle" in sections:
        table += oracle_section(args, results, save, start)
        logger.info("oracle engine released: %s", release())
    if "eagle3" in sections:
        table += eagle3_section(args, results, save, start)
    save()
    print_table(table)
    print(f"total {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
