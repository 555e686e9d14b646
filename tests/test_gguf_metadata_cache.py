"""The GGUF load cache (fxllm/models/gguf_cache.py, gguf_fastload.py): a warm load of the embedded SmolLM2
from its entry gives the cold (transformers) load's model and tokenizer exactly; bad, stale and wrong
entries are never served."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fxllm.models.embedded import embedded_gguf_path, load_gguf
from fxllm.models.gguf_cache import ENTRY, GgufCache, _canonical, _sha256, key_parts
from fxllm.models.gguf_fastload import model_difference, tensors_difference, tokenizer_difference

CPU = torch.device("cpu")


def _load(**kw: Any) -> tuple[Any, Any]:
    return load_gguf(embedded_gguf_path(), device=CPU, dtype=torch.float32, attn_implementation=None, **kw)


def _entries(root: Path) -> list[Path]:
    return (
        sorted(p for p in (root / "gguf").iterdir() if not p.name.startswith("."))
        if (root / "gguf").is_dir()
        else []
    )


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The transformers load of the embedded GGUF (which writes the entry), and the cache root it went to."""
    root = tmp_path_factory.mktemp("fxllm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXLLM_CACHE_DIR", str(root))
        mp.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
        model, tokenizer = _load()
    assert len(_entries(root)) == 1, "the cold load writes one entry"
    return model, tokenizer, root


@pytest.fixture
def cache_root(cold: tuple[Any, Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root holding a copy of the cold load's entry, used by this test's loads."""
    root = tmp_path / "cache"
    shutil.copytree(cold[2], root)
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(root))
    # A start points these at the cache root: set them here so they are restored at teardown.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    return root


def _greedy(model: Any, tokenizer: Any) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_warm_load_is_the_cold_load(cold: tuple[Any, Any, Path], cache_root: Path, caplog: Any) -> None:
    """Every tensor bit-equal, same configs and tokenizer, same greedy tokens; no GGUF metadata parsed."""
    import gguf

    model, tokenizer, _ = cold
    opened: list[str] = []
    real_reader = gguf.GGUFReader

    def counting_reader(*args: Any, **kwargs: Any) -> Any:
        opened.append(str(args[0]))
        return real_reader(*args, **kwargs)

    with (
        caplog.at_level(logging.INFO, logger="fxllm.models.gguf_fastload"),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setattr(gguf, "GGUFReader", counting_reader)
        warm_model, warm_tokenizer = _load()
    assert "GGUF cache hit" in caplog.text
    assert opened == [], "a warm load must not parse the file's metadata"
    assert model_difference(model, warm_model) is None
    assert tokenizer_difference(tokenizer, warm_tokenizer) is None
    assert _greedy(warm_model, warm_tokenizer) == _greedy(model, tokenizer)
    # The comparison the cache's publication rests on sees a one-element change.
    changed = copy.deepcopy(warm_model)
    with torch.no_grad():
        changed.model.layers[3].self_attn.k_proj.weight[5, 7] += 1e-3
    assert model_difference(model, changed) == "tensor model.layers.3.self_attn.k_proj.weight differs"


def _damage(entry: Path, how: str) -> None:
    if how == "truncate tokenizer.json":
        data = (entry / "tokenizer.json").read_bytes()
        (entry / "tokenizer.json").write_bytes(data[: len(data) // 2])
    elif how == "edit entry.json":
        text = (entry / ENTRY).read_text()
        (entry / ENTRY).write_text(text.replace('"permute_heads": 9', '"permute_heads": 3', 1))
        assert text != (entry / ENTRY).read_text()
    else:  # well-formed, but made for other settings: its recorded parts differ from the key's
        stored = json.loads((entry / ENTRY).read_text())
        stored["parts"]["dtype"] = "bfloat16"
        stored.pop("checksum")
        stored["checksum"] = _sha256(_canonical(stored))
        (entry / ENTRY).write_text(json.dumps(stored))


@pytest.mark.parametrize("damage", ["truncate tokenizer.json", "edit entry.json", "entry of another key"])
def test_bad_entry_is_detected_and_removed(damage: str, cache_root: Path, caplog: Any) -> None:
    """A truncated or corrupted entry, or one copied from another key, is never served: logged and removed."""
    (entry,) = _entries(cache_root)
    _damage(entry, damage)
    cache = GgufCache(cache_root)
    with caplog.at_level(logging.WARNING, logger="fxllm.models.gguf_cache"):
        assert cache.read(key_parts(embedded_gguf_path(), "float32", None)) is None
    assert "is unusable" in caplog.text
    assert not entry.exists()


def test_bad_entry_is_rebuilt_by_the_load(cold: tuple[Any, Any, Path], cache_root: Path, caplog: Any) -> None:
    """A start that finds a damaged entry loads the file cold, right, and writes the entry again."""
    (entry,) = _entries(cache_root)
    _damage(entry, "truncate tokenizer.json")
    with caplog.at_level(logging.INFO, logger="fxllm.models"):
        model, tokenizer = _load()
    assert "is unusable" in caplog.text and "GGUF cache hit" not in caplog.text
    assert "GGUF cache: stored" in caplog.text
    assert model_difference(cold[0], model) is None
    assert tokenizer_difference(cold[1], tokenizer) is None
    assert len(_entries(cache_root)) == 1


def test_changed_file_misses(tmp_path: Path) -> None:
    """An entry is keyed by the file's size and mtime (and versions, dtype): a touched file finds no entry."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(60))
    cache = GgufCache(tmp_path / "cache")
    (tmp_path / "files").mkdir()
    parts = key_parts(source, "float32", None)
    assert cache.write(parts, {"x": 1}, tmp_path / "files") is not None
    assert cache.read(parts) is not None
    assert cache.read(key_parts(source, "bfloat16", None)) is None
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.read(key_parts(source, "float32", None)) is None
    assert key_parts(source, "float32", None)["source"]["mtime_ns"] != parts["source"]["mtime_ns"]


def test_entry_that_loads_differently_is_not_kept(
    cold: tuple[Any, Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A recipe that does not reproduce transformers' tensors (here: q/k permutation dropped) is never published."""
    import fxllm.models.gguf_fastload as fastload

    real = fastload.tensor_recipes

    def no_permute(reader: Any, model: Any) -> list[dict[str, Any]]:
        return [{**r, "permute_heads": None} for r in real(reader, model)]

    monkeypatch.setattr(fastload, "tensor_recipes", no_permute)
    monkeypatch.setenv("FXLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FXLLM_NO_COMPILE_CACHE", raising=False)
    with caplog.at_level(logging.INFO, logger="fxllm.models"):
        model, _ = _load()
    # The check goes through the file's tensors in order: blk.0's attn_k comes before its attn_q.
    assert "not keeping the entry" in caplog.text and "k_proj.weight differs" in caplog.text
    assert _entries(tmp_path) == []
    assert model_difference(cold[0], model) is None


@pytest.mark.parametrize("fault", ["offset + one block", "offset + one row", "offset + 4 bytes", "swapped names",
                                   "norm offset + 4 bytes", "q without permutation", "data shape"])  # fmt: skip
def test_the_sampled_check_catches_a_wrong_recipe(cold: tuple[Any, Any, Path], fault: str) -> None:
    """The write-time check (fxllm/models/gguf_check.py) compares every recipe with the cold load on a strided
    sample of rows: one tensor's offset shifted by a block, a row or 4 bytes, two same-shape tensors swapped, a
    norm's offset shifted, q's head permutation dropped, a wrong shape: each is caught and names the tensor."""
    from fxllm.models.gguf_check import recipes_difference
    from fxllm.models.gguf_dequant import _BLOCKS
    from fxllm.models.gguf_fastload import _tensors_of

    model, _, root = cold
    (entry,) = _entries(root)
    recipes = json.loads((entry / ENTRY).read_text())["tensors"]
    tensors = _tensors_of(model)
    assert recipes_difference(embedded_gguf_path(), recipes, tensors) is None
    at = {r["gguf"]: i for i, r in enumerate(recipes)}
    up, gate = at["blk.7.ffn_up.weight"], at["blk.7.ffn_gate.weight"]
    r = recipes[up]
    if fault == "offset + one block":
        recipes[up] = {**r, "offset": r["offset"] + _BLOCKS[r["ggml_type"]][1]}
    elif fault == "offset + one row":
        recipes[up] = {**r, "offset": r["offset"] + r["nbytes"] // r["data_shape"][0]}
    elif fault == "offset + 4 bytes":
        recipes[up] = {**r, "offset": r["offset"] + 4}
    elif fault == "swapped names":
        recipes[up], recipes[gate] = (
            {**r, "name": recipes[gate]["name"]},
            {**recipes[gate], "name": r["name"]},
        )
    elif fault == "norm offset + 4 bytes":
        r = recipes[at["blk.7.ffn_norm.weight"]]
        recipes[at["blk.7.ffn_norm.weight"]] = {**r, "offset": r["offset"] + 4}
    elif fault == "q without permutation":
        r = recipes[at["blk.7.attn_q.weight"]]
        recipes[at["blk.7.attn_q.weight"]] = {**r, "permute_heads": None}
    else:
        recipes[up] = {**r, "data_shape": [r["data_shape"][0] // 2, r["data_shape"][1] * 2]}
    problem = recipes_difference(embedded_gguf_path(), recipes, tensors)
    assert problem is not None and problem.startswith(f"tensor {r['name']} differs"), problem


def test_weights_only_model_keys_like_the_real_one(cold: tuple[Any, Any, Path], cache_root: Path) -> None:
    """The weights-only model has the real model's tensors (same objects' values, names, order, ties) and its
    compile-cache key; materialized, it is the cold load again."""
    from fxllm.compiler.cache_build import start_key
    from fxllm.config import load_config
    from fxllm.models.gguf_weights import WeightsOnlyModel

    model = cold[0]
    stub, _ = _load(weights_only=True)
    assert isinstance(stub, WeightsOnlyModel)
    assert tensors_difference(model, stub) is None
    config = load_config(None, ["model.model=smollm2"])
    args = ("smollm2", CPU, torch.float32)
    assert start_key(config, stub, *args)[1] == start_key(config, model, *args)[1]
    real = stub.fxllm_materialize()
    assert model_difference(model, real) is None
    assert real.model.embed_tokens.weight.data_ptr() == stub.model.embed_tokens.weight.data_ptr(), "no copy"


def test_weights_only_start_imports_no_model_classes(cold: tuple[Any, Any, Path], cache_root: Path) -> None:
    """In a fresh interpreter, a weights-only load from the entry leaves transformers' modeling_utils (and
    scipy through its losses) unimported: the seconds item 2 of issue 13 is about."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from fxllm.models import load_model\n"
        "loaded = load_model('smollm2', weights_only=True)\n"
        "print(type(loaded.model).__name__, loaded.tokenizer is not None,\n"
        "      [m for m in ('transformers.modeling_utils', 'scipy') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "FXLLM_CACHE_DIR": str(cache_root)})  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "WeightsOnlyModel True []", out.stderr[-2000:]


def test_engine_from_weights_only_model_cold_then_warm(cache_root: Path, caplog: Any) -> None:
    """A start on the weights-only model that misses the compile cache builds the HF model for the capture; the
    next start hits the compile cache with the weights-only model; both generate the same tokens."""
    from fxllm import LLM, SamplingParams

    overrides = [
        "model.model=smollm2",
        "compile.backend=eager",
        "cache.num_blocks=64",
        "model.max_model_len=256",
    ]
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    outputs, infos = [], []
    for _ in range(2):
        with caplog.at_level(logging.INFO):
            llm = LLM(overrides=overrides)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
        outputs.append([list(o.outputs[0].token_ids) for o in outs])
        infos.append(llm.build_info.compile_cache)
        del llm
    assert infos[0].startswith("miss") and infos[1] == "hit"
    assert "built the HF model around the loaded weights" in caplog.text
    assert caplog.text.count("weights only") == 2
    assert outputs[0] == outputs[1]
