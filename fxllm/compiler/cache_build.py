"""The post-pass graph of a start: from the compile cache when an entry matches, else captured and
transformed by the passes (and written to the cache for the next start)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from fxllm.backends.registry import import_device_backends
from fxllm.compiler.backends import CPP_WRAPPER_META, FREEZING_META
from fxllm.compiler.cache import GraphCache, cache_root, use_cache_root
from fxllm.compiler.cache_graph import WeightRecorder, named_tensors
from fxllm.compiler.cache_key import cache_key_parts, key_of, registered_code
from fxllm.compiler.capture import capture
from fxllm.compiler.standalone import ARTIFACT_DIR_META, STANDALONE_META
from fxllm.ops.kv_quant import KV_SCALES_ATTR, scale_tensor
from fxllm.passes.pipeline import PassReport, run_passes
from fxllm.passes.registry import PassContext

logger = logging.getLogger(__name__)

DISABLE_ENV = "FXLLM_NO_COMPILE_CACHE"  # set to 1 to neither read nor write post-pass graphs
CAPTURE_PREFIX = "model"  # the capture wrapper holds the model as `.model`: graph attributes are model.<fqn>


@dataclass
class GraphBuild:
    """The graph the runner compiles, and how it was obtained."""

    gm: GraphModule
    report: PassReport
    capture_seconds: float
    passes_seconds: float
    cache: str  # "hit", "miss (why)", "off (why)"
    cache_seconds: float = 0.0  # reading the entry on a hit, writing it on a miss
    entry: Path | None = None  # the compile-cache entry holding this graph (Inductor's artifact goes there)


def _cold(model: torch.nn.Module, ctx: PassContext, passes: Any, recorder: WeightRecorder | None) -> tuple[
        GraphModule, PassReport, float, float]:  # fmt: skip
    captured = capture(model)
    logger.info("running the passes")
    start = time.perf_counter()
    if recorder is None:
        report = run_passes(captured.gm, ctx, passes, include_runtime=True)
    else:
        with recorder:  # learns how the passes derive weights (merged, packed) from the model's
            report = run_passes(captured.gm, ctx, passes, include_runtime=True)
    return captured.gm, report, captured.seconds, time.perf_counter() - start


def _capturable(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model to capture: a weights-only GGUF model (fxllm/models/gguf_weights.py) made real."""
    materialize = getattr(model, "fxllm_materialize", None)
    if materialize is None:
        return model
    start = time.perf_counter()
    real: torch.nn.Module = materialize()
    logger.info("compile cache miss: built the HF model around the loaded weights in %.1f s",
                time.perf_counter() - start)  # fmt: skip
    return real


def kv_cache_part(cache_dtype: str, kv_scales: dict[int, tuple[Any, Any]]) -> str:
    """The key's "kv cache" part: the cache dtype and the checkpoint's scales (stored in the entry as constants)."""
    if not kv_scales:
        return cache_dtype
    values = {layer: [scale_tensor(s).tolist() for s in pair] for layer, pair in sorted(kv_scales.items())}
    return f"{cache_dtype}; scales {hashlib.sha256(repr(values).encode()).hexdigest()[:16]}"


def start_key(
    config: Any, model: torch.nn.Module, model_name: str, device: torch.device, dtype: torch.dtype
) -> tuple[str, dict[str, str], str | None]:
    """The cache key of this start, its parts, and why the cache is off (None when it is on)."""
    compile_config = config.compile
    # The device's built-in backends register on import: import them before the registries are read, or
    # a process's first key would differ from its later ones.
    import_device_backends(device)
    registered, unhashable = registered_code()
    off = None
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        off = f"{DISABLE_ENV} is set"
    elif unhashable:
        off = f"passes {unhashable} are defined outside a source file, so their changes cannot be seen"
    parts = cache_key_parts(
        model_name=model_name, model=model, device=device, dtype=dtype, passes=compile_config.passes,
        op_backends=compile_config.op_backends, plugins=list(compile_config.plugins), registered=registered,
        quantization=getattr(config, "quantization", None),
    )  # fmt: skip
    cache_config = getattr(config, "cache", None)
    # Freezing does not change the post-pass graph, but it decides whether Inductor's compiled graph can be
    # cached, so entries made with and without it stay apart (the start-up log then says which).
    parts["compile.cpu_freezing"] = (
        str(getattr(compile_config, "cpu_freezing", "auto")) if device.type == "cpu" else "-"
    )
    # Likewise the C++ wrapper: the same graph, another compiled artifact.
    parts["compile.cpu_cpp_wrapper"] = (
        str(bool(getattr(compile_config, "cpu_cpp_wrapper", False))) if device.type == "cpu" else "-"
    )
    parts["kv cache"] = kv_cache_part(
        getattr(cache_config, "dtype", "auto"), dict(getattr(model, KV_SCALES_ATTR, {}) or {})
    )
    return key_of(parts), parts, off


def build_graph(
    config: Any, model: torch.nn.Module, model_name: str, device: torch.device, dtype: torch.dtype
) -> GraphBuild:
    """Capture + passes (runtime ones included) for `model`, through the compile cache; the graph carries
    the settings its graph backend reads (compile.cpu_freezing) in `gm.meta`."""
    built = _build_graph(config, model, model_name, device, dtype)
    built.gm.meta[FREEZING_META] = str(getattr(config.compile, "cpu_freezing", "auto"))
    built.gm.meta[CPP_WRAPPER_META] = bool(getattr(config.compile, "cpu_cpp_wrapper", False))
    built.gm.meta[STANDALONE_META] = bool(getattr(config.compile, "standalone", True))
    if built.entry is not None:
        built.gm.meta[ARTIFACT_DIR_META] = str(built.entry)
    return built


def _build_graph(
    config: Any, model: torch.nn.Module, model_name: str, device: torch.device, dtype: torch.dtype
) -> GraphBuild:
    compile_config = config.compile
    ctx = PassContext(model_config=model.config, device=device, dtype=dtype,
                      op_backends=dict(compile_config.op_backends), kv_cache_dtype=config.cache.dtype,
                      kv_scales=dict(getattr(model, KV_SCALES_ATTR, {}) or {}),
                      quantization=getattr(config, "quantization", None),
                      parallel=getattr(model, "fxllm_tensor_parallel", None))  # fmt: skip
    root = cache_root(getattr(compile_config, "cache_dir", None))
    use_cache_root(root)
    start = time.perf_counter()
    key, parts, off = start_key(config, model, model_name, device, dtype)
    if off is not None:
        logger.info("compile cache off: %s", off)
        gm, report, capture_s, passes_s = _cold(_capturable(model), ctx, compile_config.passes, None)
        return GraphBuild(gm, report, capture_s, passes_s, f"off ({off})")
    cache = GraphCache(root)
    model_tensors = dict(named_tensors(model, CAPTURE_PREFIX))
    with cache.lock(key):
        hit = cache.load(key, parts, model_tensors, device)
        if hit is not None:
            logger.info("compile cache hit: %s (graph and weights bound in %.1f s; capture and passes skipped)",
                        cache.entry_path(key), time.perf_counter() - start)  # fmt: skip
            return GraphBuild(
                hit.gm, hit.report, 0.0, 0.0, "hit", time.perf_counter() - start, cache.entry_path(key)
            )
        why = cache.explain_miss(parts)
        logger.info("compile cache miss (%s): capturing %s and running the passes; the result goes to %s",
                    why, model_name, cache.entry_path(key))  # fmt: skip
        if hasattr(model, "fxllm_materialize"):  # weights only: capture needs the HF model (same tensors)
            model = _capturable(model)
            model_tensors = dict(named_tensors(model, CAPTURE_PREFIX))
        recorder = WeightRecorder(model, CAPTURE_PREFIX)
        gm, report, capture_s, passes_s = _cold(model, ctx, compile_config.passes, recorder)
        start = time.perf_counter()
        gm = cache.store(key, parts, gm, recorder, report, model_tensors)
        entry = cache.entry_path(key) if cache.has_entry(key) else None  # None: the graph was not cacheable
        return GraphBuild(
            gm, report, capture_s, passes_s, f"miss ({why})", time.perf_counter() - start, entry
        )
