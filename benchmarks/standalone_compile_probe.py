"""Probe: can Inductor's standalone_compile give a warm start its compiled graph without Dynamo (issue 13)?

Usage (CPU, from the repo root):
    PYTHONPATH=. python benchmarks/standalone_compile_probe.py compile --freezing off --path /tmp/art.bin
    PYTHONPATH=. python benchmarks/standalone_compile_probe.py load --path /tmp/art.bin   # a fresh process
`compile` builds tiny-llama's post-pass graph (eager engine), compiles it with
torch._inductor.standalone_compile on one prefill's inputs (shapes specialised: from_example_inputs)
and saves the artifact; `load` loads it in a fresh process with an empty Inductor cache and calls it with
the graph's weights (lifted as leading inputs: parameters, then buffers) plus the step's inputs.
Each prints seconds and the max difference from the eager graph.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Any

import torch

logger = logging.getLogger("fxllm.standalone_probe")


def _graph_and_args() -> tuple[torch.fx.GraphModule, list[Any]]:
    """tiny-llama's post-pass graph and the arguments of one 5-token prefill."""
    from fxllm import LLM
    from fxllm.runtime.step_inputs import StepInputs

    llm = LLM(overrides=["model.model=tiny-llama", "compile.backend=eager", "cache.num_blocks=64"])
    runner = llm.engine.runner
    n = 5
    inputs = StepInputs(
        input_ids=torch.arange(1, n + 1)[None], position_ids=torch.arange(n)[None], slot_mapping=torch.arange(n),
        block_tables=torch.tensor([[0]], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), logits_indices=torch.tensor([n - 1]), sampled=[0],
    )  # fmt: skip
    return runner.graph_module, list(runner.signature.arguments(inputs.named_args(), runner._cache_by_name))


def main() -> int:
    """Compile and save, or load and call; prints the timings."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("compile", "load"))
    parser.add_argument("--path", required=True)
    parser.add_argument("--freezing", choices=("on", "off"), default="off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.mode == "load":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(
            prefix="probe-inductor-"
        )  # the artifact only
    gm, step_args = _graph_and_args()
    reference = gm(*step_args)[0].clone()
    start = time.perf_counter()
    if args.mode == "compile":
        artifact = torch._inductor.standalone_compile(
            gm, step_args, dynamic_shapes="from_example_inputs",
            options={"config_patches": {"freezing": args.freezing == "on"}},
        )  # fmt: skip
        logger.info("standalone_compile (freezing %s): %.1f s", args.freezing, time.perf_counter() - start)
        out = artifact(*step_args)[0]
        logger.info("max difference from the eager graph: %.2e", (out - reference).abs().max().item())
        try:
            artifact.save(path=args.path, format="binary")
        except RuntimeError as error:
            logger.info("save failed: %s", str(error)[:200])
            return 1
        logger.info("saved %d bytes (the graph's weights: %d bytes)", os.path.getsize(args.path),
                    sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()]))  # fmt: skip
        return 0
    artifact = torch._inductor.CompiledArtifact.load(path=args.path, format="binary")
    logger.info("load: %.2f s", time.perf_counter() - start)
    weights = [*gm.parameters(), *gm.buffers()]
    start = time.perf_counter()
    out = artifact(*weights, *step_args)[0]
    logger.info("first call: %.2f s; max difference from the eager graph: %.2e", time.perf_counter() - start,
                (out - reference).abs().max().item())  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
