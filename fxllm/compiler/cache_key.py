"""The compile cache's key: everything the post-pass graph and its compiled code depend on, but weights.

The key is a flat dict of named parts, hashed together into the entry's address. Each entry keeps its
parts, so a miss can say which part changed ("dtype: float32 -> bfloat16", "fxllm source (passes)").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import fxllm

FORMAT_VERSION = 1  # bump when the entry layout or the serialized graph changes

# The packages whose code decides the post-pass graph and what it calls: capture, passes, ops, kernels.
_PACKAGE_ROOT = Path(fxllm.__file__).parent
SOURCE_DIRS: dict[str, Path] = {
    "compiler": _PACKAGE_ROOT / "compiler",
    "passes": _PACKAGE_ROOT / "passes",
    "ops": _PACKAGE_ROOT / "ops",
    "backends": _PACKAGE_ROOT / "backends",
}
_SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cu")


def digest(value: Any) -> str:
    """A short sha256 of `value`'s canonical JSON (bytes hashed as they are)."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def tree_digest(directory: Path) -> str:
    """sha256 over the names and contents of the source files under `directory`."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def _tree_digest_once(directory: Path) -> str:
    # Once per process: the code that runs is what was imported, and a start's key must not change
    # under it while files are being edited.
    return tree_digest(directory)


def source_digests(plugins: list[str]) -> dict[str, str]:
    """One digest per fxllm package that shapes the graph, and one per plugin module's source."""
    parts = {f"source:{name}": _tree_digest_once(directory) for name, directory in SOURCE_DIRS.items()}
    for name in plugins:
        module = importlib.import_module(name)
        path = Path(getattr(module, "__file__", "") or "")
        if path.name == "__init__.py":
            parts[f"source:plugin:{name}"] = tree_digest(path.parent)
        elif path.is_file():
            parts[f"source:plugin:{name}"] = digest(path.read_bytes())
    return parts


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_identity(device: torch.device) -> str:
    """What compiled code is specific to: the GPU's name and capability, or the CPU's model and ISA flags."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"
    if device.type == "cpu":
        from fxllm.backends.cpu.native import _cpu_id

        return f"{platform.machine()} {digest(_cpu_id().encode())}"
    return device.type


def _model_structure(model: torch.nn.Module) -> str:
    """Names, shapes and dtypes of the model's tensors (not their values), tied ones included."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return digest([(name, list(t.shape), str(t.dtype)) for name, t in named])


def _model_class(model: torch.nn.Module) -> str:
    # A weights-only GGUF model (fxllm/models/gguf_weights.py) names the class it stands for.
    return getattr(model, "fxllm_model_class", None) or f"{type(model).__module__}.{type(model).__qualname__}"


def _model_config(hf_config: Any) -> str:
    to_dict = getattr(hf_config, "to_dict", None)
    data = to_dict() if callable(to_dict) else vars(hf_config)
    # Bookkeeping fields that do not reach the graph.
    for field in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype"):
        data.pop(field, None)
    return digest(data)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _source_file_digest(fn: Any) -> str | None:
    """A digest of the file that defines `fn`; None when it has none (a REPL or notebook cell)."""
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    return digest(Path(path).read_bytes()) if path and Path(path).is_file() else None


def _priority_key(priority: Any) -> Any:
    """A backend's priority as the key holds it: the number, or a per-site function's name and file digest."""
    if isinstance(priority, int):
        return priority
    return [getattr(priority, "__qualname__", type(priority).__name__), str(_source_file_digest(priority))]


def registered_code() -> tuple[list[Any], list[str]]:
    """What the registries hold that fxllm's own sources do not cover: every user pass and every user op
    backend (where it is defined, a digest of that file, a backend's priority); and the names of passes
    whose code has no file, which the cache cannot tell apart from another version of themselves.

    fxllm's own backends are left out: their code is in the source digests, and which of them a process
    has imported (the CUDA collectives after a tensor-parallel test, say) must not change the key."""
    from fxllm.backends.registry import REFERENCE, implementation, op_backends
    from fxllm.ops.registry import canonical_ops
    from fxllm.passes.pipeline import ordered_passes

    passes: list[Any] = []
    unhashable: list[str] = []
    for spec in ordered_passes():
        if spec.builtin:
            passes.append((spec.name, spec.stage))
            continue
        functions = [spec.fn]
        rewrites = getattr(spec.fn, "rewrites", None)  # a PatternPass: its code is in its rewrites
        if rewrites is not None:
            functions = [f for r in rewrites for f in (r.search, r.replace, r.extra_check) if f is not None]
        digests = [_source_file_digest(f) for f in functions]
        if None in digests:
            unhashable.append(spec.name)
        passes.append((spec.name, spec.stage, spec.needs_runtime, sorted(map(str, digests))))
    backends: dict[str, list[Any]] = {}
    for op in sorted(canonical_ops()):
        impls = [implementation(op, name) for name in op_backends(op) if name != REFERENCE]
        user = [
            (i.name, _priority_key(i.priority), str(_source_file_digest(i.defining_code())))
            for i in impls
            if not i.builtin
        ]
        if user:
            backends[op] = user
    return [passes, backends], unhashable


def _parallel_part(model: torch.nn.Module) -> str:
    """Tensor parallelism: the rank, the group size and its group (fxllm.runtime.distributed.sharding)."""
    info = getattr(model, "fxllm_tensor_parallel", None)
    return "rank 0 of 1" if info is None else str(info.key_part())


def cache_key_parts(
    *,
    model_name: str,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    passes: Mapping[str, Any],
    op_backends: Mapping[str, str],
    plugins: list[str],
    registered: Any,
    quantization: Any = None,
) -> dict[str, str]:
    """Every part of the key, by name; values are short strings (digests for the large ones)."""
    return {
        "format": str(FORMAT_VERSION),
        "model": model_name,
        "model class": _model_class(model),
        "model config": _model_config(model.config),
        "model tensors": _model_structure(model),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "device identity": device_identity(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": str(_package_version("triton")) if device.type == "cuda" else "-",
        "transformers": str(_package_version("transformers")),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "fxllm": fxllm.__version__,
        "compile.passes": digest({k: _jsonable(v) for k, v in passes.items()}),
        "compile.op_backends": digest(dict(op_backends)),
        "compile.plugins": digest(list(plugins)),
        "registered passes": digest(registered[0]),
        "op implementations": digest(registered[1]),
        "parallel": _parallel_part(model),
        "quantization": quantization_part(quantization),
        **source_digests(plugins),
    }


def quantization_part(quantization: Any) -> str:
    """The key's "quantization" part: "none", or the method and every setting (FP8 never shares bf16's entry)."""
    if quantization is None or getattr(quantization, "method", "none") == "none":
        return "none"
    return json.dumps(dataclasses.asdict(quantization), sort_keys=True)


def key_of(parts: Mapping[str, str]) -> str:
    """The entry's address: a sha256 of every part."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()[:32]


def explain_difference(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """Which parts differ between two keys, e.g. "dtype float32 -> bfloat16; source:passes changed"."""
    changes = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        # Digests say nothing to a reader: name the part only.
        readable = len(str(before)) < 40 and len(str(after)) < 40 and not _is_digest(before, after)
        changes.append(f"{name} {before} -> {after}" if readable else f"{name} changed")
    return "; ".join(changes) or "no difference"


def _is_digest(*values: str | None) -> bool:
    return all(v is not None and len(v) == 16 and all(c in "0123456789abcdef" for c in v) for v in values)
