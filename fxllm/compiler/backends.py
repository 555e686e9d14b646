"""Graph backends: how a transformed GraphModule becomes a callable (eager, inductor, ...)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from torch.fx import GraphModule

from fxllm.compiler.inductor_fallbacks import register_custom_op_fallbacks

logger = logging.getLogger(__name__)

GraphBackend = Callable[[GraphModule], Callable[..., object]]
_GRAPH_BACKENDS: dict[str, GraphBackend] = {}


def register_graph_backend(name: str) -> Callable[[GraphBackend], GraphBackend]:
    """Decorator: register a function that compiles a transformed GraphModule."""

    def decorate(fn: GraphBackend) -> GraphBackend:
        _GRAPH_BACKENDS[name] = fn
        return fn

    return decorate


def get_graph_backend(name: str) -> GraphBackend:
    """The graph backend `name`; a clear error lists the registered ones."""
    try:
        return _GRAPH_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown compile backend {name!r}; choose one of {sorted(_GRAPH_BACKENDS)}"
        ) from None


@register_graph_backend("eager")
def eager_backend(gm: GraphModule) -> Callable[..., object]:
    """Run the transformed graph as it is (debugging, and the fastest start-up)."""
    return gm


FREEZING_META = (
    "fxllm_cpu_freezing"  # gm.meta key: compile.cpu_freezing ("auto" / "on" / "off") for this graph
)
_OLD_FREEZING_ENV = "FXLLM_CPU_FREEZING"  # replaced by compile.cpu_freezing
# gm.meta key: compile.cpu_cpp_wrapper for this graph (absent: off)
CPP_WRAPPER_META = "fxllm_cpu_cpp_wrapper"


def cpu_freezing(gm: GraphModule) -> tuple[bool, str]:
    """Whether Inductor should freeze `gm`'s weights on the CPU, and why.

    Freezing lets oneDNN pre-pack the weights of plain linears: SmolLM2 float32 decode 23.7 -> 30.1 tok/s
    at batch 1 and 169 -> 242 at 16 requests (in-process A/B, 2-core AVX2 box, 2026-11-27; earlier
    160 -> 309 with oneDNN GEMMs). But a frozen graph with oneDNN-packed weights bypasses Inductor's graph
    cache and AOTAutograd's cache (torch 2.13), so every start compiles the graph again (minutes on 2
    cores). The linears are pre-packed outside the graph instead: fxllm's packed kernel where it runs
    (pack_linears, AVX-512), else oneDNN over a weight packed on its first call (fxllm_cpu::onednn_linear,
    chosen by the lowering); nothing is then left to pre-pack, nothing is frozen, and a warm start loads
    the compiled graph from the caches. Freezing remains for plain linears neither took (a dtype oneDNN
    does not pack here, or compile.op_backends.linear=torch). The graph's `compile.cpu_freezing` (set in
    gm.meta by the builder; "auto" when absent) can force either way."""
    if os.environ.get(_OLD_FREEZING_ENV):
        raise ValueError(f"{_OLD_FREEZING_ENV} is no longer read: unset it and use the config option "
                         "compile.cpu_freezing=on|off|auto (e.g. `fxllm serve --set compile.cpu_freezing=off`)")  # fmt: skip
    mode = gm.meta.get(FREEZING_META, "auto")
    if mode in ("on", "off"):
        return mode == "on", f"compile.cpu_freezing={mode}"
    if mode != "auto":
        raise ValueError(f"compile.cpu_freezing must be auto, on or off, got {mode!r}")
    linears = [
        n for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
        if isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "get_attr"
    ]  # fmt: skip
    if linears:
        return True, f"{len(linears)} linears for oneDNN to pre-pack (no packed kernel for them here)"
    onednn = sum(str(n.target) == "fxllm_cpu.onednn_linear.default" for n in gm.graph.nodes)
    if onednn:
        return False, f"no plain linears left to pre-pack: {onednn} run oneDNN over pre-packed weights"
    return False, "no plain linears left to pre-pack"


def _inductor_settings(gm: GraphModule, device: torch.device) -> dict[str, object]:
    """Inductor settings for graphs on `device` (patched in around compiling calls)."""
    if device.type != "cpu":
        return {}
    # On CUDA freezing would only duplicate folded weights. (torch.compile's `options` did not switch it
    # on here, so the config is patched around calls.)
    freeze, why = cpu_freezing(gm)
    if freeze:
        logger.info("Inductor freezes the weights (%s): its compiled graph is not cached, every start compiles "
                    "it; compile.cpu_freezing=off trades decode speed for cached starts", why)  # fmt: skip
    else:
        logger.info("Inductor does not freeze the weights (%s): its compiled graph is cached", why)
    settings: dict[str, object] = {"freezing": freeze}
    from fxllm.backends.cpu import native

    if gm.meta.get(CPP_WRAPPER_META, False) and native.available():
        # compile.cpu_cpp_wrapper: a C++ wrapper calls the whole graph without Python between kernels
        # (SmolLM2 bf16 decode 9.03 -> 8.66 ms a step at batch 1, 2026-11-27), but compiling it was more than
        # half of a cold start (config.py). It needs the same compiler as the native kernels.
        settings["cpp_wrapper"] = True
    return settings


class InductorGraph:
    """A graph compiled by Inductor through Dynamo; once `freeze_guards` is called, calls skip Dynamo's
    guard checks (0.2-0.3 ms per call for SmolLM2: ~200 guards per compiled variant)."""

    def __init__(self, gm: GraphModule, settings: dict[str, object] | None = None) -> None:
        from fxllm.passes.graph_utils import graph_device

        self._inductor_patches = _inductor_settings(gm, graph_device(gm)) if settings is None else settings
        self.num_compiles = 0
        self.guards_frozen = False
        self.num_unfrozen = 0  # calls that needed a new variant after freeze_guards
        self._compiled = torch.compile(gm, backend=self._compile, dynamic=True)

    def _compile(self, gm: GraphModule, example_inputs: list[object]) -> Callable[..., object]:
        from torch._inductor.compile_fx import compile_fx

        self.num_compiles += 1
        # Progress a user can read during a cold start: each variant is one Inductor compile (minutes on a
        # few cores when its caches are cold, or with frozen weights), a cached one takes seconds.
        frozen = bool(self._inductor_patches.get("freezing"))
        logger.info("Inductor: compiling graph variant %d (%d nodes%s)", self.num_compiles, len(gm.graph.nodes),
                    ", weights frozen: not cacheable" if frozen else "")  # fmt: skip
        start = time.perf_counter()
        register_custom_op_fallbacks(gm)
        compiled = compile_fx(gm, example_inputs)
        logger.info(
            "Inductor: graph variant %d ready in %.1f s", self.num_compiles, time.perf_counter() - start
        )
        return compiled

    def freeze_guards(self) -> None:
        """Promise that every later call matches a variant compiled so far (the caller has checked
        that a varied warm-up needed no new compile): Dynamo then runs only the guards that tell
        those variants apart. Inputs that no variant fits make torch raise before anything runs, and
        `__call__` turns the checks back on; what goes unchecked is what all variants share (the same
        weights and KV-cache tensors every step, which the runtime guarantees)."""
        self.guards_frozen = True

    def __call__(self, *args: object) -> object:
        if self.guards_frozen:
            # No compile happens now, so the shape and Inductor settings below are not needed
            # (entering them cost ~40 us per call).
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(*args)
            except RuntimeError as error:
                # Raised before anything runs when no compiled variant fits these inputs.
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self.guards_frozen = False
                self.num_unfrozen += 1
                logger.warning("a call needed a variant not compiled in warm-up: Dynamo guard checks are back on "
                               "(%d time(s) so far)", self.num_unfrozen)  # fmt: skip
        # Size-oblivious reasoning: a batch of 1 sequence or 1 sampled token must not specialise
        # (and later recompile) the graph the way sizes 0 and 1 otherwise do.
        with (
            torch.fx.experimental._config.patch(backed_size_oblivious=True, use_duck_shape=False),
            torch._inductor.config.patch(self._inductor_patches),
        ):
            return self._compiled(*args)


@register_graph_backend("inductor")
def inductor_backend(gm: GraphModule) -> Callable[..., object]:
    """Compile with Inductor (the lowering pass already chose each op's kernel or inlined its reference):
    the runtime graph without Dynamo where its builder allows it (compiler/standalone.py), else through
    torch.compile."""
    from fxllm.compiler.standalone import STANDALONE_META, StandaloneGraph
    from fxllm.passes.graph_utils import graph_device
    from fxllm.passes.runtime_signature import runtime_signature

    settings = _inductor_settings(gm, graph_device(gm))
    if gm.meta.get(STANDALONE_META) and runtime_signature(gm) is not None:
        if not settings.get("freezing"):
            return StandaloneGraph(gm, settings)
        # Frozen (oneDNN-packed) weights leave no AOTAutograd artifact to save: nothing to load next start.
        logger.info("frozen weights: the graph is compiled through Dynamo (compile.standalone needs "
                    "compile.cpu_freezing=off on this CPU)")  # fmt: skip
    return InductorGraph(gm, settings)
