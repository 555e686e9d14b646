"""The pass pipeline: one declared list of built-in passes, user passes by stage, a report."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from fxllm.passes.graph_utils import deferred_recompile, flush_recompile, refresh_meta
from fxllm.passes.registry import STAGES, PassContext, PassSpec, registered_passes

logger = logging.getLogger(__name__)

# The built-in pipeline, in order (user passes of a stage run after its built-in ones).
BUILTIN_PIPELINE: tuple[str, ...] = (
    "cleanup",
    "match_attention",
    "match_rope",
    "match_rms_norm",
    "match_gated_mlp",
    "fuse_add_rms_norm",
    "merge_linears",
    "merge_fp8_linears",  # an FP8 checkpoint's q/k/v and gate/up fxllm::fp8_linear layers -> one GEMM each
    "quantize_fp8",  # quantization.method fp8: every GEMM but `exclude` -> fxllm::fp8_linear
    "fuse_fp8_quant",  # quantization.fuse_activation_quant on: the e4m3 quantization into our norm / SiLU kernels
    "shard_tp",  # tensor parallelism: an all-reduce after each row-parallel linear (no-op on one rank)
    "fuse_allreduce_rms_norm",
    "insert_cached_attention",
    "fuse_rope_attention",  # RoPE into the cached attention kernels where they can rotate (Triton on CUDA)
    "gather_logits",
    "expose_hidden_states",  # speculative.method eagle3: the hidden states the EAGLE-3 head reads, as an output
    "pack_linears",
    "linear_ops",
    "lower_ops",  # last: every canonical op node gets its implementation
)


CODEGEN = "recompile"  # the report's row for generating the graph's code once, after the last pass


class PassError(RuntimeError):
    """A pass raised; the message names the pass and how to skip it."""


@dataclass
class PassConfig:
    """Per-pass settings from config.yml (`passes: {name: {enabled, skip_on_error, options}}`)."""

    enabled: bool = True
    skip_on_error: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassRecord:
    """One row of the pass report."""

    name: str
    stage: str
    status: str  # "ran", "disabled", "failed", "skipped (runtime)"
    matches: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class PassReport:
    """The per-pass table printed by `report()` and `fxllm compile --explain`."""

    records: list[PassRecord] = field(default_factory=list)

    def matches(self, name: str) -> int:
        """Matches of the pass `name` (0 if it did not run)."""
        return sum(r.matches for r in self.records if r.name == name)

    def timings(self, at_least_s: float = 0.05) -> str:
        """The passes that took `at_least_s` or more, slowest first ("match_rope 0.41 s, ..."), for the log."""
        slow = sorted((r for r in self.records if r.seconds >= at_least_s), key=lambda r: -r.seconds)
        return (
            ", ".join(f"{r.name} {r.seconds:.2f} s" for r in slow) or f"each under {at_least_s * 1e3:.0f} ms"
        )

    def table(self) -> str:
        """A fixed-width text table."""
        lines = [f"{'pass':<26}{'stage':<18}{'status':<20}{'matches':>8}{'ms':>10}"]
        for r in self.records:
            lines.append(f"{r.name:<26}{r.stage:<18}{r.status:<20}{r.matches:>8}{r.seconds * 1e3:>10.1f}")
            lines.extend(f"    note: {note}" for note in r.notes[:5])
            if len(r.notes) > 5:
                lines.append(f"    ... {len(r.notes) - 5} more notes")
        return "\n".join(lines)


def load_plugins(module_paths: list[str]) -> None:
    """Import user modules that register passes, ops or backends (config `plugins:`)."""
    for path in module_paths:
        try:
            importlib.import_module(path)
        except ImportError as exc:
            raise ImportError(f"could not import plugin module {path!r} listed in config: {exc}") from exc


def ordered_passes() -> list[PassSpec]:
    """Built-in passes in declared order, each stage followed by its user passes."""
    import fxllm.passes.builtin  # noqa: F401  (registers the built-in passes)

    specs = {spec.name: spec for spec in registered_passes()}
    ordered: list[PassSpec] = []
    for stage in STAGES:
        ordered += [specs[name] for name in BUILTIN_PIPELINE if name in specs and specs[name].stage == stage]
        ordered += [s for s in specs.values() if s.stage == stage and s.name not in BUILTIN_PIPELINE]
    return ordered


def run_passes(
    gm: GraphModule,
    ctx: PassContext,
    config: Mapping[str, PassConfig] | None = None,
    *,
    include_runtime: bool = False,
) -> PassReport:
    """Run the pipeline over `gm` in place; runtime passes only when `include_runtime`."""
    config = dict(config or {})
    known = {spec.name for spec in ordered_passes()}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"config names unknown passes {unknown}; registered passes: {sorted(known)}")
    report = PassReport()
    # The built-in passes leave generating gm's code to the end (graph_utils.recompile); a user pass may
    # run or read the module, so it gets it up to date.
    with deferred_recompile(gm):
        for spec in ordered_passes():
            pass_config = config.get(spec.name, PassConfig())
            if spec.needs_runtime and not include_runtime:
                continue
            if not pass_config.enabled:
                report.records.append(PassRecord(spec.name, spec.stage, "disabled"))
                continue
            ctx.options = dict(pass_config.options)
            if not spec.builtin:
                flush_recompile(gm)
            start = time.perf_counter()
            try:
                result = spec.fn(gm, ctx)
            except Exception as exc:
                if not pass_config.skip_on_error:
                    raise PassError(
                        f"pass {spec.name!r} failed: {exc}. Set passes.{spec.name}.skip_on_error: true in "
                        "config.yml to continue without it, or enabled: false to turn it off."
                    ) from exc
                logger.warning("pass %s failed and was skipped (skip_on_error): %s", spec.name, exc)
                report.records.append(PassRecord(spec.name, spec.stage, "failed", notes=[str(exc)]))
                continue
            if result.graph_changed:
                gm.graph.lint()
                refresh_meta(gm)
            seconds = time.perf_counter() - start
            logger.debug("pass %s: %d matches in %.1f ms", spec.name, result.num_matches, seconds * 1e3)
            report.records.append(
                PassRecord(spec.name, spec.stage, "ran", result.num_matches, seconds, result.notes)
            )
        start = time.perf_counter()
        flush_recompile(gm)  # timed as its own row, so the report's total stays what the passes cost
        report.records.append(PassRecord(CODEGEN, "lower", "ran", 0, time.perf_counter() - start,
                                         ["the graph's Python code, generated once after the passes"]))  # fmt: skip
    logger.info("passes took %.2f s: %s", sum(r.seconds for r in report.records), report.timings())
    return report
