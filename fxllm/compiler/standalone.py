"""The runtime graph compiled by Inductor without Dynamo (`torch._inductor.standalone_compile`), its
artifact kept in the graph's compile-cache entry so a warm start loads it instead of compiling or tracing.

Dynamo re-traced the cached post-pass graph on every start (SmolLM2 on the 2-core box: ~29 of a 58.8 s
warm start; the 8B preset on an H100: most of 68.7 s) and compiled a prefill-shaped and a one-token
variant. The runner already calls the graph with a flat list of tensors of fixed rank, so Dynamo has
nothing to do: here the graph is compiled once with symbolic sizes for everything a step varies (tokens T,
sequences S, block-table width M, sampled rows N, and the pool's block count) and that one artifact serves
every step, one token or many. Its shape guards are checked when it is built: upper bounds on one size
(Inductor's 32-bit indexing) become limits checked on every call (size_limits.py; a step above one runs
through Dynamo, logged with a count); any other guard means some size is assumed, which a loaded
artifact never re-checks, so the graph goes through Dynamo instead and the log says so.

Artifact files (`inductor-<settings>.bin` and a `.json` with its size and sha256) sit beside the entry's
graph; the entry key already covers the graph, device, torch version and `compile.cpu_freezing`, and the
file name covers the Inductor settings. A file whose checksum or load fails is logged, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from fxllm.compiler.inductor_fallbacks import register_custom_op_fallbacks
from fxllm.compiler.size_limits import (
    ShapeAssumption,
    SizeCheck,
    first_violation,
    limits_from_guards,
    size_checks,
)
from fxllm.passes.runtime_signature import RuntimeSignature, runtime_signature

logger = logging.getLogger(__name__)

STANDALONE_META = "fxllm_standalone"  # gm.meta: compile.standalone (and no tensor parallelism) for this graph
ARTIFACT_DIR_META = "fxllm_artifact_dir"  # gm.meta: the compile-cache entry that keeps the artifact, if any
# Size hints of the symbolic sizes: distinct and > 1 (Inductor would specialise a 0 or 1 hint).
_HINTS = {"tokens": 61, "seqs": 3, "blocks_per_seq": 7, "rows": 5}


__all__ = ["ShapeAssumption", "StandaloneGraph", "artifact_name", "lifted_weights", "symbolic_inputs"]


def artifact_name(settings: dict[str, object]) -> str:
    """The artifact's file stem for these Inductor settings (cpp_wrapper, freezing, ...)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"inductor-{digest}"


def lifted_weights(gm: GraphModule) -> list[torch.Tensor]:
    """The graph's parameters then buffers, as AOTAutograd lifts them: a loaded artifact takes them first."""
    return [
        *dict(gm.named_parameters(remove_duplicate=False)).values(),
        *dict(gm.named_buffers(remove_duplicate=False)).values(),
    ]


def symbolic_inputs(
    signature: RuntimeSignature,
    args: Sequence[torch.Tensor],
    fake_mode: Any,
    symbols: dict[str, Any] | None = None,
) -> list[Any]:
    """Fake copies of one step's arguments whose step-dependent sizes are symbols shared across inputs
    (their sympy symbols by name go into `symbols` when given)."""
    from torch._dynamo.source import ConstantSource

    shape_env = fake_mode.shape_env

    def symbol(name: str, hint: int) -> Any:
        return shape_env.create_symintnode(shape_env.create_symbol(hint, ConstantSource(name)), hint=hint)

    caches = [a for a, i in zip(args, signature.inputs) if i.role in ("k_cache", "v_cache")]
    # All caches are views of one pool: one symbol for its block count (the pool is sized at each start).
    blocks = symbol("num_blocks", int(caches[0].shape[0]) if caches else 2)
    tokens, seqs = symbol("tokens", _HINTS["tokens"]), symbol("seqs", _HINTS["seqs"])
    width, rows = symbol("blocks_per_seq", _HINTS["blocks_per_seq"]), symbol("rows", _HINTS["rows"])
    if symbols is not None:
        named = {"num_blocks": blocks, "tokens": tokens, "seqs": seqs, "blocks_per_seq": width, "rows": rows}
        symbols.update({name: size.node.expr for name, size in named.items()})
    out = []
    with fake_mode:
        for arg, inp in zip(args, signature.inputs):
            if inp.role in ("input_ids", "position_ids"):
                shape: tuple[Any, ...] = (*arg.shape[:-1], tokens)  # [1, T] (mrope: [3, 1, T])
            elif inp.role == "slot_mapping":
                shape = (tokens,)
            elif inp.role == "block_tables":
                shape = (seqs, width)
            elif inp.role == "seq_lens":
                shape = (seqs,)
            elif inp.role == "query_start_loc":
                shape = (seqs + 1,)
            elif inp.role == "logits_indices":
                shape = (rows,)
            else:  # a KV cache: [blocks, block size, heads, dim], contiguous
                shape = (blocks, *arg.shape[1:])
            out.append(torch.empty(shape, dtype=arg.dtype, device=arg.device))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class StandaloneGraph:
    """The runtime graph as one Inductor artifact, loaded from the compile cache or compiled (and saved) on
    the first call; calls go straight to the compiled code (no Dynamo, no guards)."""

    def __init__(self, gm: GraphModule, settings: dict[str, object]) -> None:
        signature = runtime_signature(gm)
        if signature is None:
            raise ValueError("standalone compile needs the graph's runtime signature (the runtime passes)")
        self.gm = gm
        self.signature = signature
        self.settings = settings
        entry = gm.meta.get(ARTIFACT_DIR_META)
        self.path = Path(entry) / f"{artifact_name(settings)}.bin" if entry else None
        self._num_compiles = 0
        self.source = "none"  # "loaded", "compiled" or "dynamo" once the first call has run
        self._fn: Callable[..., Any] | None = None
        self._dynamo: Any = None  # the InductorGraph used where one artifact cannot serve every step
        self.limits: dict[str, int] = {}  # step sizes' upper bounds the artifact assumes (size_limits.py)
        self._oversized: Any = None  # the InductorGraph for steps above a limit, made on the first one
        self.num_oversized = 0

    def __call__(self, *args: torch.Tensor) -> Any:
        if self._fn is None:
            self._fn = self._prepare(args)
        return self._fn(*args)

    @property
    def num_compiles(self) -> int:
        """Inductor compiles so far (0 when the artifact was loaded)."""
        graphs = [g for g in (self._dynamo, self._oversized) if g is not None]
        return self._num_compiles + sum(int(g.num_compiles) for g in graphs)

    @property
    def guards_frozen(self) -> bool:
        """No Dynamo guard is checked per call (none exist, or those of the Dynamo fallback are frozen)."""
        return self._dynamo is None or bool(self._dynamo.guards_frozen)

    @property
    def num_unfrozen(self) -> int:
        """Calls that turned Dynamo's guard checks back on (only in the Dynamo fallback)."""
        return int(self._dynamo.num_unfrozen) if self._dynamo is not None else 0

    def freeze_guards(self) -> None:
        """Nothing to freeze without Dynamo; passed on where the graph went through Dynamo."""
        if self._dynamo is not None:
            self._dynamo.freeze_guards()

    def _prepare(self, args: Sequence[torch.Tensor]) -> Callable[..., Any]:
        fn = self._prepare_artifact(args)
        checks = size_checks(self.signature, self.limits) if self.source != "dynamo" else []
        if not checks:
            return fn
        logger.info("Inductor: the compiled graph takes steps up to %s (32-bit indexing); larger ones run "
                    "through Dynamo", ", ".join(f"{c.name} {c.limit}" for c in checks))  # fmt: skip
        return lambda *step: self._call_checked(fn, checks, step)

    def _call_checked(
        self, fn: Callable[..., Any], checks: list[SizeCheck], step: Sequence[torch.Tensor]
    ) -> Any:
        over = first_violation(checks, step)
        if over is None:
            return fn(*step)
        from fxllm.compiler.backends import InductorGraph

        self.num_oversized += 1
        if self._oversized is None or self.num_oversized % 1000 == 0:
            logger.warning("Inductor: a step with %s %d is above the compiled graph's limit %d: it runs through "
                           "Dynamo (%d such steps so far)", over.name, step[over.index].shape[over.dim],
                           over.limit, self.num_oversized)  # fmt: skip
        if self._oversized is None:
            self._oversized = InductorGraph(self.gm, self.settings)
        return self._oversized(*step)

    def _prepare_artifact(self, args: Sequence[torch.Tensor]) -> Callable[..., Any]:
        loaded = self._load()
        if loaded is not None:
            weights = lifted_weights(self.gm)
            self.source = "loaded"
            # A loaded artifact returns its outputs as a flat list; the graph (and the in-process artifact)
            # returns a single tensor where its output node holds one.
            if isinstance(self.gm.graph.output_node().args[0], torch.fx.Node):
                return lambda *step: loaded(*weights, *step)[0]
            return lambda *step: tuple(loaded(*weights, *step))
        try:
            compiled = self._compile(args)
        except ShapeAssumption as exc:
            from fxllm.compiler.backends import InductorGraph

            logger.warning("%s: compiling through Dynamo instead (a variant per shape class, re-traced every "
                           "start)", exc)  # fmt: skip
            self._dynamo = InductorGraph(self.gm, self.settings)
            self.source = "dynamo"
            return self._dynamo  # type: ignore[no-any-return]
        self.source = "compiled"
        return compiled

    def _load(self) -> Any:
        """The saved artifact, or None (missing; a damaged one is logged and removed)."""
        if self.path is None or not self.path.exists():
            return None
        start = time.perf_counter()
        meta_path = self.path.with_suffix(".json")
        try:
            recorded = json.loads(meta_path.read_text())
            size = self.path.stat().st_size
            if size != recorded["bytes"] or _sha256(self.path) != recorded["sha256"]:
                raise ValueError(f"{self.path.name} is {size} bytes with another checksum than recorded "
                                 "(truncated or corrupted)")  # fmt: skip
            limits = {str(k): int(v) for k, v in recorded.get("size_limits", {}).items()}
            settings = dict(self.settings)
            if _isa_probe_redundant(recorded.get("vec_isa")):
                # Inductor re-checks the CPU's vector ISA in a Python subprocess on every start (~0.4 s on
                # the 2-core box); the cold start that compiled this artifact checked the same one.
                settings["cpp.vec_isa_ok"] = True
            with torch._inductor.config.patch(settings):
                artifact = torch._inductor.CompiledArtifact.load(path=str(self.path), format="binary")
        except Exception as exc:  # whatever is wrong with it, the start goes on and compiles again
            logger.warning("compile cache: Inductor artifact %s is unusable (%s: %s); removing it and compiling",
                           self.path, type(exc).__name__, exc)  # fmt: skip
            for path in (self.path, meta_path):
                path.unlink(missing_ok=True)
            return None
        logger.info("Inductor: compiled graph loaded from %s in %.1f s (no Dynamo, no compile)", self.path,
                    time.perf_counter() - start)  # fmt: skip
        self.limits = limits
        return artifact

    def _compile(self, args: Sequence[torch.Tensor]) -> Callable[..., Any]:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self._num_compiles += 1
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        symbols: dict[str, Any] = {}
        example = symbolic_inputs(self.signature, args, fake_mode, symbols)
        logger.info("Inductor: compiling the graph (%d nodes) once for every step shape, without Dynamo%s",
                    len(self.gm.graph.nodes), "" if self.path else " (not saved: no compile-cache entry)")  # fmt: skip
        start = time.perf_counter()
        # A GraphModule over the same attributes (no copy of the weights) that Inductor may change.
        owned = GraphModule(self.gm, _copy_graph(self.gm))
        register_custom_op_fallbacks(owned)
        # Our fake mode reaches Inductor through an ambient tracing context, not the `fake_mode=` argument:
        # torch 2.11 (the GPU machines) has no such argument; "from_tracing_context" is in every version
        # since 2.8 and treats fake tensor inputs the same way.
        extra: dict[str, Any] = {}
        if "donate_graph_module" in _standalone_parameters():
            extra["donate_graph_module"] = True
        else:  # torch 2.11 deep-copies the graph module, weights included (the 8B preset ran out of memory)
            type(owned).__deepcopy__ = _copy_sharing_attributes  # type: ignore[method-assign]
        with (
            torch.fx.experimental._config.patch(backed_size_oblivious=True),
            torch._guards.tracing(torch._guards.TracingContext(fake_mode)),
        ):
            artifact = torch._inductor.standalone_compile(
                owned, example, dynamic_shapes="from_tracing_context",
                options={"config_patches": dict(self.settings)}, **extra,
            )  # fmt: skip
        self.limits = limits_from_guards([g.expr for g in fake_mode.shape_env.guards], symbols)
        logger.info("Inductor: graph ready in %.1f s", time.perf_counter() - start)
        if self.path is not None:
            self._save(artifact, _picked_vec_isa() if args and args[0].device.type == "cpu" else None)
        return artifact  # type: ignore[no-any-return]

    def _save(self, artifact: Any, vec_isa: str | None) -> None:
        assert self.path is not None
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=self.path.parent)
            os.close(fd)
            os.unlink(tmp)  # save() refuses to write over a file it did not create
            artifact.save(path=tmp, format="binary")
            tmp_path = Path(tmp)
            record = {"bytes": tmp_path.stat().st_size, "sha256": _sha256(tmp_path), "settings": self.settings,
                      "size_limits": self.limits, "created": time.time(), "torch": torch.__version__,
                      "vec_isa": vec_isa}  # fmt: skip
            self.path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
            os.replace(tmp_path, self.path)  # the .json first: a reader that sees the .bin sees its record
            logger.info("compile cache: stored the Inductor artifact %s (%.1f MiB)", self.path,
                        record["bytes"] / 2**20)  # fmt: skip
        except Exception as exc:  # a graph whose artifact cannot be written still runs; later starts compile
            logger.warning("compile cache: the Inductor artifact is not saved (%s: %s); later starts compile "
                           "the graph again", type(exc).__name__, exc)  # fmt: skip
            if tmp:
                Path(tmp).unlink(missing_ok=True)


def _picked_vec_isa() -> str | None:
    """The CPU vector ISA Inductor compiled for (its kernels' flags), None where it cannot tell."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or None
    except Exception:  # an Inductor without this API: the warm start just keeps its probe
        return None


def _isa_probe_redundant(recorded: object) -> bool:
    """Whether the ISA the artifact was compiled for is the one Inductor would pick on this CPU without its
    compile-and-load probe (the most capable one the CPU's flags list), so the probe can only agree."""
    if not isinstance(recorded, str) or not recorded:
        return False
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        if os.environ.get("ATEN_CPU_CAPABILITY") or torch._inductor.config.cpp.simdlen is not None:
            return False  # a pinned ISA: not the first candidate; keep Inductor's own choice and check
        with torch._inductor.config.patch({"cpp.vec_isa_ok": True}):
            candidates = valid_vec_isa_list.__wrapped__()  # uncached: the flags' list, nothing probed
    except Exception:
        return False
    return bool(candidates) and str(candidates[0]) == recorded


def _standalone_parameters() -> set[str]:
    return set(inspect.signature(torch._inductor.standalone_compile).parameters)


def _copy_sharing_attributes(gm: GraphModule, memo: dict[int, Any]) -> GraphModule:
    """A deep copy of the graph over the same weight tensors (each GraphModule has a class of its own)."""
    return GraphModule(gm, _copy_graph(gm))


def _copy_graph(gm: GraphModule) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph
