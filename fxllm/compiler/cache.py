"""fxllm's compile cache: post-pass graphs under `~/.cache/fxllm/graphs`, Inductor's and Triton's caches
beside them, so a second start skips capture, the passes and most of Inductor.

Layout of the cache root (`compile.cache_dir`, else `$FXLLM_CACHE_DIR`, else `~/.cache/fxllm`):
`graphs/<key>/` (manifest.json + graph.pkl, one entry per key), `inductor/` and `triton/` (used when
TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are not set), `torch_extensions/` (the C++ CPU kernels), `gguf/`
(GGUF files' parsed metadata and tensor offsets, fxllm/models/gguf_cache.py).
An entry is written to a temporary directory and renamed into place under a file lock, so a reader sees a
whole entry or none; its payload's sha256 is checked on load, and a bad entry is logged, removed and
rebuilt. Weights are never stored (fxllm/compiler/cache_graph.py); nodes are plain data
(fxllm/compiler/cache_nodes.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from fxllm.compiler.cache_graph import (
    WeightRecorder,
    bind_weights,
    build_graph_module,
    verify_weights,
    weight_recipes,
)
from fxllm.compiler.cache_key import FORMAT_VERSION, explain_difference
from fxllm.compiler.cache_nodes import UncacheableGraph, encode_graph

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PAYLOAD = "graph.pkl"
LOCK_TIMEOUT_S = 900.0  # a cold build of a large model under load; after that a start builds on its own
_META_KEYS = ("fxllm_runtime_signature", "fxllm_lowering")  # what the runtime and --explain read
# FXLLM_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR: the values this process set (for the current
# engine's root), and the user's values from before it set them. While a variable still holds our value, the
# user's is the one saved here: a later engine without compile.cache_dir must not inherit an earlier one's.
_ENV_WE_SET: dict[str, str] = {}
_ENV_BEFORE: dict[str, str | None] = {}
DEFAULT_ROOT = Path("~/.cache/fxllm")


def _user_env(name: str) -> str | None:
    """Environment variable `name` as the user set it (its value from before fxllm set it, where it did)."""
    current = os.environ.get(name)
    if name in _ENV_WE_SET and current == _ENV_WE_SET[name]:
        return _ENV_BEFORE.get(name)
    return current


def _set_env(name: str, value: str) -> None:
    if _user_env(name) == os.environ.get(name):  # the current value is the user's: keep it for _user_env
        _ENV_BEFORE[name] = os.environ.get(name)
    os.environ[name] = _ENV_WE_SET[name] = value


def cache_root(configured: str | None = None) -> Path:
    """The cache root: `compile.cache_dir`, else the user's `$FXLLM_CACHE_DIR`, else `~/.cache/fxllm` (never
    a root an earlier engine of this process set)."""
    if configured:
        return Path(configured).expanduser()
    return Path(_user_env("FXLLM_CACHE_DIR") or DEFAULT_ROOT).expanduser()


def current_root() -> Path:
    """The root this process's caches point at now: the last `use_cache_root`'s, else `cache_root()`."""
    return Path(os.environ.get("FXLLM_CACHE_DIR") or DEFAULT_ROOT).expanduser()


def use_cache_root(root: Path) -> None:
    """Point this process's caches at `root` (the engine being built): fxllm's C++ kernels and GGUF entries
    (FXLLM_CACHE_DIR), and Inductor's and Triton's unless the user set TORCHINDUCTOR_CACHE_DIR /
    TRITON_CACHE_DIR, which are never overwritten."""
    _set_env("FXLLM_CACHE_DIR", str(root))
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its default into the environment on first use: that value is not a user's choice.
    defaults = {"TORCHINDUCTOR_CACHE_DIR": os.path.abspath(default_cache_dir())}
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        user = _user_env(name)
        if user is None or user == defaults.get(name):
            _set_env(name, os.path.abspath(root / sub))  # absolute, as Inductor writes it back


@dataclass
class CachedGraph:
    """What a hit gives back: the graph with its weights bound, and the cold start's pass report."""

    gm: GraphModule
    report: Any  # the PassReport of the start that built the entry
    key: str
    seconds: float


@dataclass
class EntryInfo:
    """One entry, as `fxllm cache list` shows it."""

    key: str
    path: Path
    model: str
    dtype: str
    device: str
    created: float
    size_bytes: int
    ok: bool  # False when its manifest cannot be read


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class GraphCache:
    """Post-pass graphs by key under `root/graphs`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.graphs = root / "graphs"

    def entry_path(self, key: str) -> Path:
        """The directory of entry `key`."""
        return self.graphs / key

    def has_entry(self, key: str) -> bool:
        """Whether entry `key` is on disk (its manifest is written last)."""
        return (self.entry_path(key) / MANIFEST).exists()

    @contextmanager
    def lock(self, key: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[bool]:
        """Hold the lock of `key` (concurrent starts of one model build it once); yields False when it
        could not be had within `timeout` seconds, and the caller goes on without it."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.graphs / f"{key}.lock"))
        try:
            self.graphs.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=timeout)
        except Timeout:
            logger.warning("compile cache: another start has held %s for %.0f s; building without it",
                           lock.lock_file, timeout)  # fmt: skip
            yield False
            return
        except (
            OSError
        ) as exc:  # a read-only or full disk: start without the lock (and likely without writing)
            logger.warning("compile cache: cannot lock %s (%s)", lock.lock_file, exc)
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def load(
        self,
        key: str,
        parts: Mapping[str, str],
        model_tensors: Mapping[str, torch.Tensor],
        device: torch.device,
    ) -> CachedGraph | None:
        """The entry `key` with its weights bound from `model_tensors`, or None (a bad entry is logged and
        removed, so the caller rebuilds it)."""
        path = self.entry_path(key)
        if not (path / MANIFEST).exists():
            return None
        start = time.perf_counter()
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest.get("format") != FORMAT_VERSION or manifest.get("parts") != dict(parts):
                # A hash collision or a hand-copied entry: never serve what was built for another key.
                raise ValueError(
                    f"its key parts differ: {explain_difference(manifest.get('parts', {}), parts)}"
                )
            data = (path / PAYLOAD).read_bytes()
            if len(data) != manifest["payload_bytes"] or _sha256(data) != manifest["payload_sha256"]:
                raise ValueError(f"{PAYLOAD} is {len(data)} bytes with another checksum than recorded (truncated "
                                 "or corrupted)")  # fmt: skip
            payload = pickle.loads(data)
            _load_implementations(payload["meta"], device)
            values = bind_weights(payload["recipes"], model_tensors)
            gm = build_graph_module(payload["nodes"], payload["recipes"], values, payload["meta"])
            signature = gm.meta.get("fxllm_runtime_signature")
            if signature is not None:
                signature.check(gm)
        except Exception as exc:  # whatever is wrong with an entry, the start goes on and rebuilds it
            logger.warning("compile cache: entry %s is unusable (%s: %s); removing it and rebuilding",
                           path, type(exc).__name__, exc)  # fmt: skip
            self.remove(key)
            return None
        return CachedGraph(gm, payload["report"], key, time.perf_counter() - start)

    def explain_miss(self, parts: Mapping[str, str]) -> str:
        """Why no entry serves `parts`: the key parts that changed since this model's closest entry."""
        best: tuple[int, float, dict[str, str]] | None = None
        for manifest in self._manifests():
            old = manifest.get("parts", {})
            if old.get("model") != parts.get("model"):
                continue
            changed = sum(old.get(k) != v for k, v in parts.items()) + len(set(old) - set(parts))
            candidate = (changed, -float(manifest.get("created", 0)), old)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return f"no entry for model {parts.get('model')!r} yet"
        return f"the closest entry of model {parts.get('model')!r} differs in: {explain_difference(best[2], parts)}"

    def store(
        self,
        key: str,
        parts: Mapping[str, str],
        gm: GraphModule,
        recorder: WeightRecorder,
        report: Any,
        model_tensors: Mapping[str, torch.Tensor],
    ) -> GraphModule:
        """Write `gm` as entry `key` and return the graph rebuilt from the entry (weights re-derived and
        checked), which is what a warm start will run; returns `gm` itself when it cannot be cached."""
        try:
            recipes = weight_recipes(gm, recorder)
            nodes = encode_graph(gm.graph)
            meta = {k: gm.meta[k] for k in _META_KEYS if k in gm.meta}
            values = bind_weights(recipes, model_tensors)
            problem = verify_weights(values, gm)
            if problem is not None:
                raise UncacheableGraph(problem)
            rebuilt = build_graph_module(nodes, recipes, values, meta)
            if rebuilt.code != gm.code:
                raise UncacheableGraph("the graph does not come back with the same code")
            payload = {"nodes": nodes, "recipes": recipes, "meta": meta, "report": report}
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a graph the cache cannot write down still runs; only later starts pay
            logger.warning("compile cache: this graph is not cached (%s); later starts run capture and the "
                           "passes again", exc)  # fmt: skip
            return gm
        manifest = {
            "format": FORMAT_VERSION, "key": key, "parts": dict(parts), "created": time.time(),
            "payload_bytes": len(data), "payload_sha256": _sha256(data), "nodes": len(nodes),
            "derived_steps": len(recipes.steps), "stored_bytes": recipes.stored_bytes,
        }  # fmt: skip
        self._publish(key, data, manifest)
        return rebuilt

    def _publish(self, key: str, data: bytes, manifest: dict[str, Any]) -> None:
        self.graphs.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.graphs))
        try:
            for name, content in ((PAYLOAD, data), (MANIFEST, json.dumps(manifest, indent=1).encode())):
                with open(tmp / name, "wb") as fh:
                    fh.write(content)
                    fh.flush()
                    os.fsync(fh.fileno())
            final = self.entry_path(key)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)  # atomic: readers see the whole entry or none
        except OSError as exc:
            logger.warning("compile cache: could not write entry %s (%s)", key, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("compile cache: stored %s (%.1f MiB)", self.entry_path(key), len(data) / 2**20)

    def remove(self, key: str) -> None:
        """Delete entry `key` (missing is fine)."""
        shutil.rmtree(self.entry_path(key), ignore_errors=True)

    def _manifests(self) -> Iterator[dict[str, Any]]:
        if not self.graphs.is_dir():
            return
        for path in self.graphs.iterdir():
            if path.is_dir() and not path.name.startswith("."):
                try:
                    yield json.loads((path / MANIFEST).read_text())
                except (OSError, ValueError):
                    continue

    def entries(self) -> list[EntryInfo]:
        """Every entry (unreadable ones included, with ok=False), newest first."""
        infos = []
        if self.graphs.is_dir():
            for path in self.graphs.iterdir():
                if not path.is_dir() or path.name.startswith("."):
                    continue
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                try:
                    manifest = json.loads((path / MANIFEST).read_text())
                    parts = manifest["parts"]
                    infos.append(EntryInfo(path.name, path, parts["model"], parts["dtype"], parts["device"],
                                           float(manifest["created"]), size, True))  # fmt: skip
                except (OSError, ValueError, KeyError):
                    infos.append(EntryInfo(path.name, path, "?", "?", "?", path.stat().st_mtime, size, False))
        return sorted(infos, key=lambda e: -e.created)


def _load_implementations(meta: Mapping[str, Any], device: torch.device) -> None:
    """Load every op implementation the graph's nodes call (the C++ library, Triton kernels, reference ops),
    so the graph's ops resolve; an implementation that no longer loads makes the entry stale."""
    from fxllm.backends.registry import REFERENCE, implementation, import_device_backends
    from fxllm.ops.registry import canonical_ops
    from fxllm.passes.lower_ops import INLINED, reference_op

    import_device_backends(device)
    for decision in meta.get("fxllm_lowering", []):
        if decision.target == INLINED:
            continue
        if decision.backend == REFERENCE:
            reference_op(canonical_ops()[decision.op])
        elif implementation(decision.op, decision.backend).target() is None:
            raise RuntimeError(f"implementation {decision.backend} of op {decision.op} no longer loads")


def directory_size(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


CACHE_PARTS = ("graphs", "gguf", "inductor", "triton", "torch_extensions")  # what `fxllm cache clear` removes


def describe(root: Path) -> str:
    """`fxllm cache list`: every post-pass graph entry, then the size of each part of the cache."""
    lines = [f"fxllm compile cache at {root}"]
    entries = GraphCache(root).entries()
    if entries:
        lines.append(f"{'key':<34}{'model':<28}{'dtype':<10}{'device':<8}{'MiB':>8}  created")
        for e in entries:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
            note = "" if e.ok else "  (unreadable: rebuilt on next use)"
            lines.append(f"{e.key:<34}{e.model[:27]:<28}{e.dtype:<10}{e.device:<8}{e.size_bytes / 2**20:>8.1f}  "
                         f"{created}{note}")  # fmt: skip
    else:
        lines.append("no post-pass graphs")
    for part in CACHE_PARTS:
        lines.append(f"{part + '/':<18}{directory_size(root / part) / 2**20:>10.1f} MiB")
    return "\n".join(lines)


def clear(root: Path, graphs_only: bool = False) -> list[Path]:
    """`fxllm cache clear`: remove the post-pass graphs (and, unless `graphs_only`, Inductor's and Triton's
    caches and the C++ kernels' build) under `root`; returns what was removed."""
    removed = []
    for part in ("graphs",) if graphs_only else CACHE_PARTS:
        path = root / part
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
