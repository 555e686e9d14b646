"""fxllm's configuration: one dataclass tree, loaded from config.yml and CLI overrides.

Every option has a default that works on a CPU-only machine. Unknown keys are errors that name
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from fxllm.config_speculative import SPECULATIVE_VALUE_CHECKS, SpeculativeConfig
from fxllm.config_types import (
    ConfigTypeError,
    check_auto_on_off,
    check_non_negative,
    check_value,
    one_of,
    type_name,
)
from fxllm.dtypes import is_auto_dtype, parse_dtype
from fxllm.ops.kv_quant import check_cache_dtype
from fxllm.passes.pipeline import PassConfig
from fxllm.runtime.scheduler import SchedulerConfig


@dataclass
class ModelConfig:
    """Which model, where, in what precision."""

    model: str = "smollm2"  # embedded default, preset name, HF folder or .gguf path
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu
    # None = the model config's max_position_embeddings (capped by the KV pool)
    max_model_len: int | None = None
    seed: int = 0  # seed for presets' random weights
    num_layers: int | None = None  # presets only: override the layer count


@dataclass
class CacheConfig:
    """The paged KV cache pool."""

    block_size: int = 16
    gpu_memory_fraction: float = 0.85  # of the memory free after loading weights, on CUDA
    cpu_kv_bytes: int = 512 * 2**20  # the pool's size on the CPU
    num_blocks: int | None = None  # set to force an exact pool size (tests use tiny pools)
    enable_prefix_caching: bool = True
    # "auto": the model's dtype; "fp8": float8_e4m3fn (half the bytes of bf16, so twice the blocks), with
    # per-layer K/V scales from the checkpoint where it has them, else 1.0 (docs/quantization.md).
    dtype: str = "auto"


@dataclass
class CompileConfig:
    """How the forward is compiled and which kernels the ops use."""

    backend: str = "inductor"  # "inductor" or "eager"
    passes: dict[str, PassConfig] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)  # modules to import that register passes/ops/schedulers
    op_backends: dict[str, str] = field(default_factory=dict)  # op -> backend ("torch", "triton", ...)
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (GPU only)
    # Decode buckets, capped at scheduler.max_num_seqs; a step pads up to the next bucket.
    cuda_graph_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    )
    # The compile cache (post-pass graphs, Inductor's and Triton's caches, the C++ CPU kernels):
    # None = $FXLLM_CACHE_DIR, else ~/.cache/fxllm. `fxllm cache list` / `fxllm cache clear` manage it.
    cache_dir: str | None = None
    # Inductor's weight freezing on the CPU: "auto" freezes only where plain linears are left for oneDNN to
    # pre-pack (decode speed) and otherwise not (the compiled graph is then cached); "on" / "off" force it.
    # Linears are pre-packed outside the graph (fxllm's packed kernel, else fxllm_cpu::onednn_linear), so
    # "auto" freezes only for linears neither takes (e.g. bfloat16 where oneDNN does not pack it).
    # A frozen graph is never cached by Inductor: every start compiles it again. (YAML reads a bare on / off
    # as a bool, so True / False are taken too.)
    cpu_freezing: str | bool = "auto"
    # Inductor's C++ wrapper on the CPU (one generated C++ function that calls every kernel of the graph,
    # compiled with -O3). Off by default: for SmolLM2 on the 2-core box it was more than half of a cold start's
    # compile (133.7 vs 51.5 s, idle) and decode was no faster without it (batch 1: 29.5 vs 34.4 tok/s,
    # benchmarks/RESULTS.md, eleventh session). Needs fxllm's C++ CPU kernels (else off anyway).
    cpu_cpp_wrapper: bool = False
    # Inductor compiles the runtime graph without Dynamo (torch._inductor.standalone_compile), once for every
    # step shape, and the compile cache keeps the artifact: a warm start loads it (no Dynamo re-trace).
    # Off (or with frozen weights, or tensor parallelism): through torch.compile, a variant per shape class.
    standalone: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.cpu_freezing, bool):
            self.cpu_freezing = "on" if self.cpu_freezing else "off"


@dataclass
class ParallelConfig:
    """Tensor parallelism: one process per rank (docs/parallelism.md)."""

    tensor_parallel_size: int = 1  # ranks the model is split over; heads and KV heads must divide by it
    distributed_backend: str = "auto"  # "auto" (nccl on CUDA, gloo on the CPU), "gloo" or "nccl"
    # Fuse all-reduce + residual add + RMSNorm into one op (fuse_allreduce_rms_norm pass); off until its
    # accuracy at hidden 4096 is measured (TensorRT-LLM turned it off for hidden <= 4096).
    fuse_allreduce_rms_norm: bool = False
    # Split the LM head by vocabulary rows (each rank reads 1/N of it; its logits are all-gathered), where
    # the head is a linear of its own (not tied to the embedding) and the vocabulary divides by the size.
    vocab_parallel_lm_head: bool = True
    # Split the input embedding by vocabulary rows too (each rank holds 1/N of the table; one more
    # all-reduce per step, of [tokens, hidden]): saves memory, costs latency; off by default.
    vocab_parallel_embedding: bool = False
    # Largest message (bytes) of the peer-to-peer one-shot / two-shot all-reduce on CUDA; NCCL above.
    one_shot_max_bytes: int = 256 * 1024
    two_shot_max_bytes: int = 8 * 2**20
    # Largest message (bytes) of the "triton_lamport" all-reduce backend (one barrier-free launch;
    # backends/cuda_lamport.py), where compile.op_backends chooses it; above it symm_mem runs. 0 = never.
    lamport_max_bytes: int = 256 * 1024
    collective_timeout_s: float = 300.0  # a collective waiting longer fails (a dead rank never hangs)
    master_port: int | None = None  # the rendezvous port on 127.0.0.1; None = a free port


@dataclass
class QuantizationConfig:
    """FP8 weights and activations (docs/quantization.md): which GEMMs, which scale granularity."""

    # none | fp8. An FP8 checkpoint (compressed-tensors, ModelOpt) is served as stored under either value;
    # fp8 then also quantizes its float linears outside `exclude`.
    method: str = "none"
    # FP8 weight scales: channel (one per output feature), tensor (one), block (one per 128 x 128 tile).
    weight_granularity: str = "channel"
    # dynamic_token: each token's scale is its amax / 448 at run time; dynamic_tensor: one scale per GEMM
    # input, the whole step's amax / 448 at run time; static_tensor: one scale per GEMM input, from the
    # checkpoint (input_scale): every FP8 layer of the checkpoint must have one.
    activation_scheme: str = "dynamic_token"
    # Linears left in the model's dtype, matched against the module path or weight name (`lm_head` matches
    # `lm_head.weight`; `mlp.down_proj` every layer's down projection).
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    # auto | on | off: the per-token activation quantization written by the kernel that produces the
    # activation (fxllm's fused add + RMSNorm, SiLU-and-mul; pass fuse_fp8_quant) instead of ATen ops
    # after it. auto = on on CUDA (measured faster on an H200), off on the CPU (docs/quantization.md).
    fuse_activation_quant: str = "auto"


@dataclass
class ServerConfig:
    """The OpenAI-compatible server."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also read from FXLLM_API_KEY
    served_model_name: str | None = None  # defaults to model.model
    max_request_bytes: int = 1 << 20
    max_n: int = 16
    # Limits on what one request may ask for (docs/serving.md, "Limits"): each answers 400 beyond.
    max_seqs_per_request: int = 256  # prompts x n: sequences one request adds to the scheduler
    max_stop_strings: int = 16  # OpenAI allows 4
    max_stop_chars: int = 1024  # total length of the stop strings
    max_stop_token_ids: int = 64
    max_json_depth: int = 32  # nesting of the request body's JSON
    max_prompt_bytes: int | None = None  # None: max_model_len x the longest token's bytes
    shutdown_drain_s: float = 10.0  # on SIGTERM, streams get this long to finish before they are cut


@dataclass
class FxllmConfig:
    """The whole configuration tree (the structure of config.yml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


def _check_type(hint: Any, value: Any, key: str) -> Any:
    """`value` as the field's declared type (config_types.check_value), or a ValueError naming the key
    and the type."""
    try:
        return check_value(hint, value)
    except ConfigTypeError as exc:
        detail = f" ({key}{exc.where}: {exc})" if exc.where else ""
        raise ValueError(
            f"config: {key} must be {type_name(hint)}, got {type(value).__name__} {value!r}{detail}"
        ) from None


def _check_dtype(value: str) -> None:
    if not is_auto_dtype(value):
        parse_dtype(value, auto_allowed=True)


# Checks of a value beyond its type, by dotted key: they fail at load, not at engine build.
def _check_tp_size(value: int) -> None:
    if value < 1:
        raise ValueError(f"must be >= 1 (1 = no tensor parallelism), got {value}")


def _check_distributed_backend(value: str) -> None:
    if value not in ("auto", "gloo", "nccl"):
        raise ValueError(f"must be auto, gloo or nccl, got {value!r}")


_VALUE_CHECKS: dict[str, Callable[[Any], None]] = {
    "quantization.method": one_of("none", "fp8"),
    "quantization.weight_granularity": one_of("channel", "tensor", "block"),
    "quantization.activation_scheme": one_of("dynamic_token", "dynamic_tensor", "static_tensor"),
    "quantization.fuse_activation_quant": one_of("auto", "on", "off"),
    "model.dtype": _check_dtype,
    "cache.dtype": check_cache_dtype,
    "compile.cpu_freezing": check_auto_on_off,
    "parallel.tensor_parallel_size": _check_tp_size,
    "parallel.distributed_backend": _check_distributed_backend,
    "parallel.lamport_max_bytes": check_non_negative,
    **SPECULATIVE_VALUE_CHECKS,
}


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"config: {path or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(
            f"config: unknown key {where}{unknown[0]}; known keys here: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, {} if value is None else value, sub)
        elif key == "passes":
            from fxllm.compiler.api import normalize_pass_config

            if value is not None and not isinstance(value, Mapping):
                raise ValueError(
                    f"config: {sub} must be a mapping of pass name -> bool or settings, got {value!r}"
                )
            kwargs[key] = normalize_pass_config(value or {})
        else:
            kwargs[key] = _check_type(hint, value, sub)
            check = _VALUE_CHECKS.get(sub)
            if check is not None:
                try:
                    check(kwargs[key])
                except ValueError as exc:
                    raise ValueError(f"config: {sub}: {exc}") from None
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> FxllmConfig:
    """Build the config tree from a nested mapping (config.yml's contents)."""
    return _build(FxllmConfig, data or {}, "")


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def _hint_at(parts: list[str]) -> Any:
    """The declared type of the dotted key `parts` (None where the tree does not declare one)."""
    hint: Any = FxllmConfig
    for part in parts:
        if dataclasses.is_dataclass(hint):
            hint = get_type_hints(hint).get(part)
        elif get_origin(hint) is dict:
            hint = get_args(hint)[1]
        else:
            return None
        if hint is None:
            return None
    return hint


def _takes_text(hint: Any) -> bool:
    return hint is str or (get_origin(hint) in (Union, types.UnionType) and str in get_args(hint))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) onto a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(
                f"override {item!r} must look like section.key=value, e.g. scheduler.max_num_seqs=32"
            )
        dotted, text = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        value = _parse_scalar(text)
        # A string field takes the text as typed: YAML would turn `api_key=0123` into the int 83.
        if value is not None and not isinstance(value, str) and _takes_text(_hint_at([*parents, leaf])):
            value = text.strip()
        node[leaf] = value
    return data


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> FxllmConfig:
    """Load config.yml (if given) and apply `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {file} does not exist")
        data = yaml.safe_load(file.read_text()) or {}
    data = apply_overrides(data, overrides or [])
    config = config_from_dict(data)
    if config.server.api_key is None and os.environ.get("FXLLM_API_KEY"):
        config.server.api_key = os.environ["FXLLM_API_KEY"]
    return config
