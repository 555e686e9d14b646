"""What a warm `fxllm serve` start no longer repeats (issue 13): Inductor's CPU vector-ISA probe when the
artifact was compiled for the ISA the probe would pass, and the per-token Python decode behind the prompt
byte limit (one Rust batch decode gives the same texts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cache_roots import usual_compiled_code_dirs
from smollm2_tokenizer import smollm2_tokenizer

from fxllm.compiler.standalone import _isa_probe_redundant
from fxllm.serve.prompts import _decodes_like_its_backend, longest_token_bytes

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "model.model=tiny-llama",
    "compile.backend=inductor",
    "compile.cpu_freezing=off",
    "cache.num_blocks=64",
]

# A warm start in a fresh interpreter (Inductor caches its ISA choice per process) that counts the probes.
_WARM_START = f"""
import json
from torch._inductor import cpu_vec_isa
probes = []
real = cpu_vec_isa.VecISA._probe_load
def counted(self, path):
    probes.append(str(self))
    return real(self, path)
cpu_vec_isa.VecISA._probe_load = counted
from fxllm import LLM
llm = LLM(overrides={BASE!r})
print(json.dumps({{"source": llm.engine.runner._forward.source, "probes": probes}}))
"""


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh compile-cache root; Inductor's and Triton's caches and the C++ kernels are the usual ones."""
    from fxllm.backends.cpu import native

    native.available()
    for name, value in usual_compiled_code_dirs().items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "fxllm-cache"
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(root))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    return root


def _warm_start() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _WARM_START], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_a_warm_artifact_load_skips_the_vector_isa_probe_the_cold_start_passed(cache_dir: Path) -> None:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from fxllm import LLM

    cold = LLM(overrides=BASE)
    assert cold.engine.runner._forward.source == "compiled"
    (meta,) = list((cache_dir / "graphs").glob("*/inductor-*.json"))
    record = json.loads(meta.read_text())
    assert record["vec_isa"] == str(pick_vec_isa())
    if not record["vec_isa"]:
        pytest.skip("Inductor found no vector ISA on this CPU: there is no probe to skip")
    warm = _warm_start()
    assert warm == {"source": "loaded", "probes": []}
    # An artifact without the record (written before it existed) or with another ISA keeps Inductor's probe.
    # (A second warm start showed the probe running for the first: 30-40 s of the suite for this decision.)
    assert _isa_probe_redundant(record["vec_isa"])
    assert not _isa_probe_redundant(None) and not _isa_probe_redundant("")
    assert not _isa_probe_redundant(record["vec_isa"] + "_other")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = smollm2_tokenizer()
    tok.clean_up_tokenization_spaces = False  # as fxllm's GGUF load leaves it (gguf_fastload.load_tokenizer)
    return tok


def _per_token_texts(tokenizer: Any) -> list[str]:
    return list(tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False))


def test_the_backend_batch_decode_gives_the_per_token_texts(tokenizer: Any) -> None:
    assert _decodes_like_its_backend(tokenizer)
    ids = [[i] for i in range(len(tokenizer))]
    expected = _per_token_texts(tokenizer)
    assert tokenizer.backend_tokenizer.decode_batch(ids, skip_special_tokens=False) == expected
    assert longest_token_bytes(tokenizer) == max(len(t.encode()) for t in expected) + 1


class _OwnDecode:
    """A tokenizer class of its own decode step (a subclass overriding `_decode`)."""

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if token_ids == [7]:
            return "x" * 500
        return super()._decode(token_ids, skip_special_tokens, **kwargs)  # type: ignore[misc]


def test_a_tokenizer_with_its_own_decode_keeps_the_per_token_decode(tokenizer: Any) -> None:
    own = type("OwnDecodeTokenizer", (_OwnDecode, type(tokenizer)), {})
    patched = own.__new__(own)
    patched.__dict__.update(tokenizer.__dict__)
    assert not _decodes_like_its_backend(patched)
    assert longest_token_bytes(patched) == 501
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert not _decodes_like_its_backend(tokenizer)
    finally:
        tokenizer.clean_up_tokenization_spaces = False
