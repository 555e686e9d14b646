"""The GGUF load cache: what a .gguf file's metadata parses to, stored once under the fxllm cache root.

gguf-py builds a numpy memmap slice per element of a GGUF file's tokenizer arrays (49,152 tokens and the
merges for SmolLM2: ~2.7 M slices, 5-7 s on an idle 2-core box, more than the rest of the load). A start
that finds an entry here reads no metadata at all: the HF config, generation config and tokenizer files
come from the entry, the weights are de-quantized straight from the tensor data section at the offsets
the entry records (fxllm/models/gguf_fastload.py).

Layout: `<cache root>/gguf/<key>/` holds entry.json (sources, recipes, a checksum of itself) and the
tokenizer's files (save_pretrained output, each with its sha256 in entry.json). The key covers the file's
resolved path, size and mtime, the gguf / transformers / torch versions, the dtype, the attention
implementation and FORMAT_VERSION, so an edited or replaced file never hits an old entry. An entry is
written to a temporary directory and renamed into place (concurrent starts: one rename wins, the other's
copy is dropped); a corrupted entry is logged, removed and rebuilt by the caller.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when entry.json's layout or the way an entry is turned into a model changes
ENTRY = "entry.json"
SUBDIR = "gguf"
# The compile cache's switch (fxllm/compiler/cache_build.py) turns this cache off too: with it set, every
# start is a cold one, all the way down.
DISABLE_ENV = "FXLLM_NO_COMPILE_CACHE"


class BadEntry(ValueError):
    """An entry that must not be served (truncated, corrupted, or made for another source)."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def source_identity(path: Path) -> dict[str, Any]:
    """What tells one .gguf file from another without reading it: resolved path, size, mtime."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def key_parts(path: Path, dtype: str, attn_implementation: str | None) -> dict[str, Any]:
    """Everything an entry depends on, by name."""
    return {
        "format": FORMAT_VERSION,
        "source": source_identity(path),
        "gguf": _version("gguf"),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "torch": _version("torch"),
        "dtype": dtype,
        "attn_implementation": attn_implementation or "default",
    }


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """A verified entry: its directory and its contents (entry.json without the checksum)."""

    path: Path
    data: dict[str, Any]


def cache_enabled() -> bool:
    """False when FXLLM_NO_COMPILE_CACHE is set."""
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


class GgufCache:
    """GGUF load entries under `root/gguf`."""

    def __init__(self, root: Path) -> None:
        self.dir = root / SUBDIR

    def entry_path(self, parts: dict[str, Any]) -> Path:
        """The directory of the entry for `parts`."""
        return self.dir / _sha256(_canonical(parts))[:32]

    def read(self, parts: dict[str, Any]) -> Entry | None:
        """The entry for `parts`, checked; None when there is none. A bad one is logged and removed."""
        path = self.entry_path(parts)
        if not (path / ENTRY).exists():
            return None
        try:
            data = self._checked(path, parts)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # whatever is wrong, rebuild it
            logger.warning("GGUF cache: entry %s is unusable (%s: %s); removing it and rebuilding",
                           path, type(exc).__name__, exc)  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Entry(path, data)

    @staticmethod
    def _checked(path: Path, parts: dict[str, Any]) -> dict[str, Any]:
        stored = json.loads((path / ENTRY).read_text())
        checksum = stored.pop("checksum", None)
        if checksum != _sha256(_canonical(stored)):
            raise BadEntry(f"{ENTRY} does not match its checksum (corrupted or edited)")
        if stored.get("parts") != parts:
            raise BadEntry(
                "it was made for another file, version or setting (key collision or a copied entry)"
            )
        for name, digest in stored["files"].items():
            if _sha256((path / name).read_bytes()) != digest:
                raise BadEntry(f"{name} does not match its checksum (truncated or corrupted)")
        return stored

    def write(self, parts: dict[str, Any], data: dict[str, Any], files_from: Path) -> Path | None:
        """Publish an entry: `data` (to which parts, file checksums and the checksum are added) plus every
        file in `files_from`; returns its directory, or None when it could not be written."""
        final = self.entry_path(parts)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.dir))
        except OSError as exc:
            logger.warning("GGUF cache: cannot write under %s (%s)", self.dir, exc)
            return None
        try:
            files = {}
            for source in sorted(files_from.iterdir()):
                content = source.read_bytes()
                (tmp / source.name).write_bytes(content)
                files[source.name] = _sha256(content)
            stored = {**data, "parts": parts, "files": files}
            stored["checksum"] = _sha256(_canonical(stored))
            (tmp / ENTRY).write_text(json.dumps(stored, sort_keys=True))
            try:
                os.rename(tmp, final)  # atomic: a reader sees the whole entry or none
            except OSError:
                if not (final / ENTRY).exists():  # not "another start published it first"
                    raise
            return final
        except OSError as exc:
            logger.warning("GGUF cache: could not write entry %s (%s)", final, exc)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
