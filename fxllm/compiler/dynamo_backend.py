"""The `fxllm` torch.compile backend: fxllm's graph passes on whatever graph Dynamo hands over.

`torch.compile(model, backend="fxllm")` gets the fused custom ops in a user's own loop (HF
`generate` included): Dynamo's graph is re-traced to the same pre-dispatch ATen IR that capture
produces, every pass that needs no runtime runs (matching what it can and logging what it
could not), and Inductor compiles the result.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from fxllm.compiler.inductor_fallbacks import register_custom_op_fallbacks
from fxllm.passes.cleanup import normalize_graph
from fxllm.passes.pipeline import run_passes
from fxllm.passes.registry import PassContext

logger = logging.getLogger(__name__)


def fxllm_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable[..., Any]:
    """torch.compile backend: passes, then Inductor."""
    from torch._inductor.compile_fx import compile_fx

    import fxllm.ops  # noqa: F401  (the passes emit fxllm ops)

    fake_mode = detect_fake_mode(example_inputs)
    # Re-tracing creates shape facts Dynamo has no source for; they hold by construction.
    guards = (
        fake_mode.shape_env.suppress_guards()
        if fake_mode and fake_mode.shape_env
        else contextlib.nullcontext()
    )
    with guards:
        traced = make_fx(gm, pre_dispatch=True, tracing_mode="fake" if fake_mode else "real")(*example_inputs)
        normalize_graph(traced)
        tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
        dtypes = [t.dtype for t in tensors if t.is_floating_point()]
        ctx = PassContext(device=tensors[0].device if tensors else torch.device("cpu"),
                          dtype=dtypes[0] if dtypes else torch.float32, weights_are_attributes=False)  # fmt: skip
        report = run_passes(traced, ctx)
        summary = {r.name: r.matches for r in report.records if r.matches}
        logger.info("fxllm backend: %s", summary or "no pattern matched")
        for record in report.records:
            for note in record.notes:
                logger.debug("fxllm backend: %s: %s", record.name, note)
        register_custom_op_fallbacks(traced)
        return compile_fx(traced, example_inputs)


def register() -> None:
    """Register the backend under the name "fxllm" (also done by the package entry point)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fxllm" not in _BACKENDS:
        register_backend(fxllm_backend, name="fxllm")


register()
