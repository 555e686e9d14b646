"""`fxllm.compile`: capture + passes + compile, as a function or a decorator."""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import GraphModule

from fxllm.compiler.backends import get_graph_backend
from fxllm.compiler.capture import CapturedGraph, capture
from fxllm.passes.graph_utils import count_ops
from fxllm.passes.lower_ops import lowering_decisions, lowering_table
from fxllm.passes.pipeline import PassConfig, PassReport, run_passes
from fxllm.passes.registry import PassContext

logger = logging.getLogger(__name__)

PassesArg = Mapping[str, PassConfig | Mapping[str, Any] | bool] | None


def normalize_pass_config(passes: PassesArg) -> dict[str, PassConfig]:
    """Accept {name: PassConfig | {"enabled": ..., ...} | bool} and return PassConfigs."""
    out: dict[str, PassConfig] = {}
    for name, value in (passes or {}).items():
        if isinstance(value, PassConfig):
            out[name] = value
        elif isinstance(value, bool):
            out[name] = PassConfig(enabled=value)
        elif isinstance(value, Mapping):
            unknown = set(value) - {"enabled", "skip_on_error", "options"}
            if unknown:
                raise ValueError(
                    f"passes.{name}: unknown keys {sorted(unknown)}; use enabled, skip_on_error, options"
                )
            out[name] = PassConfig(**dict(value))
        else:
            raise TypeError(f"passes.{name} must be a bool or a mapping, got {type(value).__name__}")
    return out


QuantizationArg = str | Mapping[str, Any] | Any | None


def quantization_config(value: QuantizationArg) -> Any:
    """`quantization=` of fxllm.compile as a checked QuantizationConfig ("fp8" = method fp8, defaults)."""
    from fxllm.config import QuantizationConfig, config_from_dict

    if value is None or isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"quantization= takes 'fp8', a mapping or a QuantizationConfig, not {type(value).__name__}"
        )
    return config_from_dict({"quantization": dict(value)}).quantization


class CompiledModel:
    """A captured, transformed and compiled forward: `cm(input_ids) -> logits`."""

    def __init__(
        self,
        captured: CapturedGraph,
        gm: GraphModule,
        report: PassReport,
        backend: str,
        compile_seconds: float,
    ) -> None:
        self.captured = captured
        self.graph_module = gm
        self.pass_report = report
        self.backend = backend
        self.compile_seconds = compile_seconds
        self.ops_after = count_ops(gm)
        self._fn = get_graph_backend(backend)(gm)

    @property
    def config(self) -> Any:
        """The Hugging Face config of the captured model."""
        return self.captured.model_config

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T] (positions default to 0..T-1)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        with torch.no_grad():
            return self._fn(input_ids, position_ids)  # type: ignore[no-any-return]

    def fxllm_op_counts(self) -> dict[str, int]:
        """How many of each canonical fxllm op the passes produced (counted before lowering, which
        replaces each by its implementation), plus any fxllm ops a disabled lowering left in place."""
        counts = Counter(f"fxllm.{d.op}.default" for d in lowering_decisions(self.graph_module))
        counts.update({k: v for k, v in self.ops_after.items() if k.startswith("fxllm.")})
        return dict(counts)

    def report(self) -> str:
        """Per-pass table (matches, time), op counts before and after, and each op node's implementation."""
        lines = [
            f"capture: {self.captured.seconds:.2f} s; passes + compile: {self.compile_seconds:.2f} s; "
            f"backend: {self.backend}",
            self.pass_report.table(),
            "",
            f"{'op':<44}{'before':>8}{'after':>8}",
        ]
        keys = sorted(set(self.captured.ops_before) | set(self.ops_after))
        interesting = [k for k in keys if self.captured.ops_before.get(k, 0) != self.ops_after.get(k, 0)]
        for key in interesting:
            lines.append(f"{key:<44}{self.captured.ops_before.get(key, 0):>8}{self.ops_after.get(key, 0):>8}")
        lines += ["", "implementations (lower_ops):", lowering_table(self.graph_module)]
        return "\n".join(lines)


def compile_model(
    model: torch.nn.Module,
    *,
    backend: str = "inductor",
    passes: PassesArg = None,
    op_backends: Mapping[str, str] | None = None,
    quantization: QuantizationArg = None,
) -> CompiledModel:
    """Capture `model`, run the pass pipeline (no runtime passes, lowering included) and compile it."""
    captured = capture(model)
    start = time.perf_counter()
    gm = captured.gm
    ctx = PassContext(model_config=captured.model_config, device=captured.device, dtype=captured.dtype,
                      op_backends=dict(op_backends or {}), quantization=quantization_config(quantization),
                      parallel=getattr(model, "fxllm_tensor_parallel", None))  # fmt: skip
    report = run_passes(gm, ctx, normalize_pass_config(passes))
    compiled = CompiledModel(captured, gm, report, backend, 0.0)
    compiled.compile_seconds = time.perf_counter() - start
    logger.info("fxllm.compile: %s", ", ".join(f"{k}={v}" for k, v in compiled.fxllm_op_counts().items()))
    return compiled


def compile(
    model: Any = None,
    *,
    backend: str = "inductor",
    passes: PassesArg = None,
    op_backends: Mapping[str, str] | None = None,
    quantization: QuantizationArg = None,
) -> Any:
    """Compile a HF model, a MODEL string, or decorate a function that returns a model (quantization: "fp8",
    a mapping of quantization.* keys, or a QuantizationConfig)."""
    options = {"backend": backend, "passes": passes, "op_backends": op_backends, "quantization": quantization}
    if model is None:
        return lambda fn: compile(fn, **options)
    if isinstance(model, torch.nn.Module):
        return compile_model(model, **options)
    if isinstance(model, str):
        from fxllm.models import load_model

        return compile_model(load_model(model).model, **options)
    if callable(model):

        @functools.wraps(model)
        def build_and_compile(*args: Any, **kwargs: Any) -> CompiledModel:
            built = model(*args, **kwargs)
            if not isinstance(built, torch.nn.Module):
                raise TypeError(
                    f"@fxllm.compile: {model.__name__} returned {type(built).__name__}, not a model"
                )
            return compile_model(built, **options)

        return build_and_compile
    raise TypeError(f"fxllm.compile takes a model, a model name or a function, not {type(model).__name__}")
