"""Speculative decoding's machinery on one GPU (issue 16): oracle and n-gram drafts, verify steps on CUDA graphs.

Usage (GPU machine, repo root, < 4 minutes on one H100 from a cold compile cache):
    PYTHONPATH=. python3 benchmarks/gpu_speculative.py --out $OUT
    PYTHONPATH=. python3 benchmarks/gpu_speculative.py --eagle3 --ks 2,4 --batches 1,8 --output-len 64 --out $OUT
The second is the EAGLE-3 section (`eagle3_main`: a random-weight head in the public layout, written to a
temporary folder; writes speculative_eagle3.json).
`--smoke` runs the same on tiny-llama on the CPU in a minute (the verify buckets run padded, uncaptured),
to check the script itself.

With random weights acceptance means nothing, so the oracle's drafts are the target's own greedy
continuation (computed first without speculation): every draft of a greedy request should be accepted,
and tok/s shows what verification costs and gains at its best (ideal ~(k + 1)x at batch 1). The n-gram
rows run prompt lookup on a repetitive prompt (a random base repeated), against plain decoding of the
same prompt. Plain decoding runs with async scheduling on (the GPU default) and off; speculation runs
synchronous steps. Each speculative run goes twice: verify steps replaying their CUDA graphs (buckets of
batch x (1 + d) tokens, captured at start-up) and, for comparison, with the verify buckets hidden
(the compiled forward called directly, as before they existed). `step_vs_decode`: wall ms per engine step
of the speculative run against a plain synchronous decode step (CUDA graph). Writes speculative.json and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fxllm.config import SpeculativeConfig, load_config
from fxllm.llm import LLM
from fxllm.runtime.cuda_graphs import DecodeGraphs
from fxllm.runtime.sampling_params import SamplingParams
from fxllm.runtime.speculative.decoder import NgramProposer, Proposer, SpeculativeDecoder
from fxllm.runtime.speculative.oracle import OracleProposer
from fxllm.serve.bench_offline import random_prompts

logger = logging.getLogger("fxllm.gpu.speculative")
PHASES = ("schedule_seconds", "inputs_seconds", "forward_seconds", "sample_seconds", "result_wait_seconds",
          "update_seconds")  # fmt: skip
COUNTERS = ("num_replays", "num_verify_replays", "num_verify_padded", "num_verify_unmatched", "num_too_large")


def _counters(graphs: DecodeGraphs | None) -> dict[str, int]:
    return {name: getattr(graphs, name) for name in COUNTERS} if graphs is not None else {}


def _run(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[dict[str, Any], list[list[int]]]:
    """Generate greedily from an empty prefix cache; tok/s, steps, ms per step, graph replays, acceptance."""
    engine = llm.engine
    graphs = engine.runner.decode_graphs
    engine.kv_cache.reset_prefix_cache()
    spec = engine.speculator.stats if engine.speculator else None
    steps0, counters0 = engine.stats.num_steps, _counters(graphs)
    phases0 = {name: getattr(engine.stats, name) for name in PHASES}
    drafted0, accepted0 = (spec.draft_tokens, spec.accepted_tokens) if spec else (0, 0)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    steps = max(engine.stats.num_steps - steps0, 1)
    tokens = [o.outputs[0].token_ids for o in outs]
    row: dict[str, Any] = {"output_tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "steps": steps,
                           "ms_per_step": 1e3 * seconds / steps}  # fmt: skip
    row["graphs"] = {k: v - counters0[k] for k, v in _counters(graphs).items()}
    # Where a step's host time goes (EngineStats phases, ms per step): what async scheduling would hide.
    row["phase_ms_per_step"] = {
        name: 1e3 * (getattr(engine.stats, name) - phases0[name]) / steps for name in PHASES
    }
    if spec is not None:
        drafted = spec.draft_tokens - drafted0
        row["acceptance"] = (spec.accepted_tokens - accepted0) / drafted if drafted else None
    return row, tokens


def _plain(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[dict[str, Any], list[list[int]]]:
    """Plain decoding with async scheduling on and off; the tokens of the synchronous run."""
    engine, plain = llm.engine, {}
    for async_on in (True, False):
        engine.speculator, engine.async_scheduling = None, async_on
        plain[f"async_{'on' if async_on else 'off'}"], tokens = _run(llm, prompts, output_len)
    engine.async_scheduling = False
    return plain, tokens


def _speculate(
    llm: LLM,
    config: SpeculativeConfig,
    proposer: Proposer,
    prompts: list[list[int]],
    want: list[list[int]],
    output_len: int,
) -> dict[str, Any]:
    """One speculative run with the verify buckets and one without (config.num_speculative_tokens drafts)."""
    engine = llm.engine
    graphs = engine.runner.decode_graphs
    result: dict[str, Any] = {}
    for mode in ("verify_graphs", "no_verify_graphs"):
        hidden = graphs.verify_buckets if graphs is not None and mode == "no_verify_graphs" else None
        if hidden is not None and graphs is not None:
            graphs.verify_buckets = []
        engine.speculator = SpeculativeDecoder(config, proposer)
        try:
            row, got = _run(llm, prompts, output_len)
        finally:
            if hidden is not None and graphs is not None:
                graphs.verify_buckets = hidden
        row["same_tokens"] = sum(a == b for a, b in zip(got, want)) / len(want)
        result[mode] = row
    engine.speculator = None
    return result


def _timed(obj: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap obj.name so its wall time (device work included: it ends in a host read) adds up in totals[name]."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(obj, name, wrapper)


def eagle3_main(args: argparse.Namespace) -> int:
    """`--eagle3`: the 8B preset with a random-weight EAGLE-3 head (acceptance ~0: the machinery is measured).

    Plain decoding (async on and off) against eagle3 at each k, one engine: tok/s, acceptance, and the head's
    time per engine step (catch-up on the accepted rows + k - 1 draft steps), with verify CUDA graphs."""
    import tempfile

    from fxllm.models.presets import preset_config
    from fxllm.runtime.speculative.eagle3_head import write_random_head

    start = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    name = "tiny-llama" if args.smoke else "llama-3.1-8b"
    target_config = preset_config(name)
    folder = Path(tempfile.mkdtemp(prefix="eagle3-head-"))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    head = write_random_head(folder, target_config, draft_vocab_size=min(32000, int(target_config.vocab_size)),
                             dtype=dtype)  # fmt: skip
    base = (
        ["model.model=tiny-llama", "model.device=cpu", "model.dtype=float32", "compile.backend=eager"]
        if args.smoke
        else [
            "model.model=llama-3.1-8b",
            "model.device=cuda",
            "model.dtype=bfloat16",
            "model.max_model_len=4096",
        ]
    )
    sizes = ",".join(map(str, batches))
    overrides = [*base, f"compile.cuda_graph_batch_sizes=[{sizes}]", "speculative.method=eagle3",
                 f"speculative.model={head}", f"speculative.num_speculative_tokens={max(ks)}",
                 "speculative.disable_batch_size=0", "speculative.min_acceptance_rate=0",
                 "speculative.auto_disable=off", *args.set]  # fmt: skip
    llm = LLM(config=load_config(None, overrides))
    engine = llm.engine
    if args.smoke:  # no CUDA on the CPU: the same buckets (hidden states packed after the logits), uncaptured
        engine.runner.enable_decode_graphs(batches, engine.max_model_len, capture=False)
    build_seconds = time.perf_counter() - start
    speculator = engine.speculator
    assert speculator is not None
    proposer = speculator.proposer
    totals: dict[str, float] = {}
    _timed(proposer, "before_step", totals)
    _timed(proposer, "propose", totals)
    results: dict[str, Any] = {"config": overrides, "output_len": args.output_len, "build_seconds": build_seconds,
                               "device": str(engine.runner.device), "rows": []}  # fmt: skip
    if engine.runner.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    out_file = Path(args.out) / "speculative_eagle3.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = []
    for batch in batches:
        prompts = random_prompts(batch, 128, engine.vocab_size, 7 + batch)
        engine.speculator = None
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm
        plain, want = _plain(llm, prompts, args.output_len)
        for k in ks:
            if time.perf_counter() - start > args.max_seconds:
                results["cut_short"] = f"stopped before batch {batch} k {k}"
                logger.warning("--max-seconds %.0f reached: %s", args.max_seconds, results["cut_short"])
                break
            speculator.config.num_speculative_tokens = k
            engine.speculator = speculator
            speculator.reset_stats()
            totals.clear()
            caught0, drafts0 = proposer.num_caught_up, proposer.num_draft_steps  # type: ignore[attr-defined]
            row, got = _run(llm, prompts, args.output_len)
            engine.speculator = None
            steps = row["steps"]
            row.update(
                batch=batch, k=k, same_tokens=sum(a == b for a, b in zip(got, want)) / len(want),
                head_catch_up_ms_per_step=1e3 * totals.get("before_step", 0.0) / steps,
                head_draft_ms_per_step=1e3 * totals.get("propose", 0.0) / steps,
                head_rows=proposer.num_caught_up - caught0,  # type: ignore[attr-defined]
                head_draft_forwards=proposer.num_draft_steps - drafts0,  # type: ignore[attr-defined]
                plain=plain, vs_async=row["output_tok_s"] / plain["async_on"]["output_tok_s"],
                step_vs_decode=row["ms_per_step"] / plain["async_off"]["ms_per_step"],
            )  # fmt: skip
            results["rows"].append(row)
            out_file.write_text(json.dumps(results, indent=1))
            table.append(row)
            logger.info("eagle3 batch %d k %d: %.1f tok/s, acceptance %s, head %.2f + %.2f ms/step, graphs %s",
                        batch, k, row["output_tok_s"], row["acceptance"], row["head_catch_up_ms_per_step"],
                        row["head_draft_ms_per_step"], row["graphs"])  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    out_file.write_text(json.dumps(results, indent=1))
    print(f"{'batch':>5} {'k':>2} {'tok/s':>8} {'plain':>8} {'x async':>7} {'accept':>6} {'same':>5} "
          f"{'ms/step':>7} {'step/decode':>11} {'head catch-up ms':>16} {'head draft ms':>13} {'replays':>7}")  # fmt: skip
    for r in table:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        replays = r["graphs"].get("num_verify_replays", 0) + r["graphs"].get("num_replays", 0)
        print(f"{r['batch']:>5} {r['k']:>2} {r['output_tok_s']:>8.1f} {r['plain']['async_on']['output_tok_s']:>8.1f} "
              f"{r['vs_async']:>7.2f} {acc:>6} {r['same_tokens']:>5.2f} {r['ms_per_step']:>7.2f} "
              f"{r['step_vs_decode']:>11.2f} {r['head_catch_up_ms_per_step']:>16.2f} "
              f"{r['head_draft_ms_per_step']:>13.2f} {replays:>7}")  # fmt: skip
    print(f"total {results['seconds']:.0f} s (engine build {build_seconds:.0f} s)")
    return 0


def main() -> int:
    """Build the engine once (verify buckets up to max k); plain, oracle and n-gram runs at each batch size."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--smoke", "--cpu-check", action="store_true", help="tiny-llama on the CPU (checks the script)"
    )
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument(
        "--max-seconds", type=float, default=225.0, help="start no new run after this (total)"
    )
    parser.add_argument(
        "--eagle3", action="store_true", help="the EAGLE-3 section: a random head on the 8B preset"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.eagle3:
        return eagle3_main(args)
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    base = (
        ["model.model=tiny-llama", "model.device=cpu", "model.dtype=float32", "compile.backend=eager"]
        if args.smoke
        else [
            "model.model=llama-3.1-8b",
            "model.device=cuda",
            "model.dtype=bfloat16",
            "model.max_model_len=4096",
        ]
    )
    # Decode buckets for the batch sizes measured only: each gets verify buckets for 1 + d, d = 1..max(ks).
    sizes = ",".join(map(str, batches))
    overrides = [*base, f"compile.cuda_graph_batch_sizes=[{sizes}]", "speculative.method=ngram",
                 f"speculative.num_speculative_tokens={max(ks)}", "speculative.disable_batch_size=0",
                 "speculative.min_acceptance_rate=0", "speculative.auto_disable=off", *args.set]  # fmt: skip
    start = time.perf_counter()
    llm = LLM(config=load_config(None, overrides))
    engine = llm.engine
    if args.smoke:  # no CUDA on the CPU: the same buckets, padded and run without capture
        engine.runner.enable_decode_graphs(batches, engine.max_model_len, capture=False)
    build_seconds = time.perf_counter() - start
    assert engine.speculator is not None
    spec_config = engine.speculator.config
    graphs = engine.runner.decode_graphs
    buckets = [(b.size, b.query_len) for b in graphs.verify_buckets] if graphs else []
    logger.info("engine built in %.1f s; verify buckets %s", build_seconds, buckets)
    vocab = engine.vocab_size
    ngram = NgramProposer(spec_config.prompt_lookup_min, spec_config.prompt_lookup_max)
    out_file = Path(args.out) / "speculative.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": overrides, "output_len": args.output_len, "build_seconds": build_seconds,
                               "verify_buckets": buckets, "device": str(engine.runner.device), "rows": []}  # fmt: skip
    if engine.runner.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    table = []
    for batch in batches:
        random_set = random_prompts(batch, 128, vocab, 7 + batch)
        # A random 32-token base repeated four times: prompt lookup finds its continuation in the prompt.
        repetitive = [p[:32] * 4 for p in random_prompts(batch, 32, vocab, 99 + batch)]
        engine.speculator = None
        llm.generate(random_set[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm
        for round_index in range(args.rounds):
            for drafter, prompts in (("oracle", random_set), ("ngram", repetitive)):
                if "cut_short" in results:
                    break
                plain, want = _plain(llm, prompts, args.output_len)
                proposer: Proposer = (
                    OracleProposer({tuple(p): w for p, w in zip(prompts, want)})
                    if drafter == "oracle"
                    else ngram
                )
                for k in ks:
                    if time.perf_counter() - start > args.max_seconds:  # rows so far are in the JSON already
                        results["cut_short"] = (
                            f"stopped before batch {batch} round {round_index} {drafter} k {k}"
                        )
                        logger.warning(
                            "--max-seconds %.0f reached: %s", args.max_seconds, results["cut_short"]
                        )
                        break
                    spec_config.num_speculative_tokens = k
                    runs = _speculate(llm, spec_config, proposer, prompts, want, args.output_len)
                    row = {
                        "batch": batch,
                        "k": k,
                        "drafter": drafter,
                        "round": round_index,
                        "plain": plain,
                        **runs,
                    }
                    results["rows"].append(row)
                    out_file.write_text(json.dumps(results, indent=1))
                    for mode, run in runs.items():
                        line = {"batch": batch, "k": k, "drafter": drafter, "mode": mode, **run,
                                "vs_async": run["output_tok_s"] / plain["async_on"]["output_tok_s"],
                                "vs_sync": run["output_tok_s"] / plain["async_off"]["output_tok_s"],
                                "step_vs_decode": run["ms_per_step"] / plain["async_off"]["ms_per_step"],
                                "plain_tok_s": plain["async_on"]["output_tok_s"]}  # fmt: skip
                        table.append(line)
                        logger.info(
                            "batch %d %s k %d %s: %.1f tok/s (%.2fx async plain), acceptance %s, graphs %s",
                            batch, drafter, k, mode, run["output_tok_s"], line["vs_async"], run["acceptance"],
                            run["graphs"],
                        )  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    out_file.write_text(json.dumps(results, indent=1))
    print(f"{'batch':>5} {'drafter':>7} {'k':>2} {'verify graphs':>13} {'tok/s':>8} {'plain':>8} {'x async':>7} "
          f"{'x sync':>6} {'accept':>6} {'same':>5} {'step/decode':>11} {'replays':>7}")  # fmt: skip
    for r in table:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        on = "on" if r["mode"] == "verify_graphs" else "off"
        print(f"{r['batch']:>5} {r['drafter']:>7} {r['k']:>2} {on:>13} {r['output_tok_s']:>8.1f} "
              f"{r['plain_tok_s']:>8.1f} {r['vs_async']:>7.2f} {r['vs_sync']:>6.2f} {acc:>6} "
              f"{r['same_tokens']:>5.2f} {r['step_vs_decode']:>11.2f} "
              f"{r['graphs'].get('num_verify_replays', 0):>7}")  # fmt: skip
    print(f"total {results['seconds']:.0f} s (engine build {build_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
