"""Load a .gguf file from its GGUF cache entry (fxllm/models/gguf_cache.py), without parsing its metadata.

The cold load goes through transformers; afterwards `store_entry` records what it produced (the HF config,
generation config, tokenizer files) and, per model tensor, where its data lies in the file and how
transformers turned it into the tensor (de-quantization, Llama's q/k head permutation). The entry is
published only if a load from it gives the same model and tokenizer as the cold load (every tensor's shape,
dtype and a strided sample of its rows bit-equal (fxllm/models/gguf_check.py), the same names, order and
ties, same configs, same tokenizer serialization and encodings), so a recipe transformers applies that this
module does not know can never reach a warm start: such a file just gets no entry.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxllm.models.gguf_cache import BadEntry, Entry, GgufCache, key_parts
from fxllm.models.gguf_check import recipes_difference, same_storage_difference
from fxllm.models.gguf_weights import (
    BUFFERS_FILE,
    WeightsOnlyModel,
    model_buffers,
    model_class_name,
    model_layout,
    weights_only_model,
)

logger = logging.getLogger(__name__)

_PROBE_TEXTS = (
    "Hello, world! How are you today?",
    " leading space, numbers 12345 and unicode: café, 日本語, emoji 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n\treturn x ** 2  # code\n",
)
_PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


class Unsupported(Exception):
    """A file whose tensors transformers converts in ways this module does not record."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _architecture(reader: Any) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def tensor_recipes(reader: Any, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per GGUF tensor that transformers loads: the HF name, where its data lies, how to de-quantize it."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    architecture = _architecture(reader)
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class not in (TensorProcessor, LlamaTensorProcessor):
        raise Unsupported(f"architecture {architecture!r} ({processor_class.__name__} reshapes its tensors)")
    config = model.config
    n_head = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None)
    name_map = get_gguf_hf_weights_map(model, processor_class(config=config.to_dict()))
    recipes = []
    for tensor in reader.tensors:
        if tensor.name not in name_map:
            continue
        permute = None
        # transformers' LlamaTensorProcessor: undo llama.cpp's rotary head permutation of q and k.
        if processor_class is LlamaTensorProcessor and None not in (n_head, n_kv):
            if ".attn_q." in tensor.name:
                permute = n_head
            elif ".attn_k." in tensor.name:
                permute = n_kv
        recipes.append({
            "name": name_map[tensor.name], "gguf": tensor.name, "ggml_type": int(tensor.tensor_type),
            "offset": int(tensor.data_offset), "nbytes": int(tensor.data.nbytes),
            "data_dtype": tensor.data.dtype.str, "data_shape": [int(s) for s in tensor.data.shape],
            "permute_heads": permute,
        })  # fmt: skip
    return recipes


def _reverse_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf permutes q/k rows per head; this is transformers' inverse.
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.transpose(1, 2).reshape(weights.shape)


def read_tensors(path: Path, recipes: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """De-quantize every recipe's tensor to float32, straight from the file's data section."""
    from fxllm.models.gguf_dequant import dequantize

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for r in recipes:
        end = r["offset"] + r["nbytes"]
        if end > raw.size:
            raise BadEntry(f"tensor {r['gguf']} ends at byte {end}, past the file's {raw.size}")
        data = raw[r["offset"] : end].view(np.dtype(r["data_dtype"])).reshape(r["data_shape"])
        weights = dequantize(data, r["ggml_type"])
        if r["permute_heads"] is not None:
            weights = _reverse_permute(weights, r["permute_heads"])
        tensors[r["name"]] = weights
    return tensors


def build_model(entry: Entry, dtype: torch.dtype, tensors: dict[str, torch.Tensor]) -> Any:
    """The HF model (on CPU) an entry describes, its parameters taken from `tensors` (by HF name)."""
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from fxllm.models.safetensors_loader import _assign, _tensor_slots, build_empty_model

    data = entry.data
    config = CONFIG_MAPPING[data["config"]["model_type"]].from_dict(data["config"])
    with torch.no_grad():
        # No init of the meta parameters: ~2 s of meta-tensor dispatch at load 8; buffers are computed as usual.
        with no_init_weights():
            model = build_empty_model(
                config, dtype=dtype, attn_implementation=data["attn_implementation"], spec=None
            )
        slots = _tensor_slots(model)
        loaded = set()
        for name, tensor in tensors.items():
            if name not in slots:
                raise BadEntry(f"tensor {name} is not in {type(model).__name__}")
            if id(slots[name]) not in loaded:  # a tied tensor comes once per name
                _assign(slots[name], tensor, name, dtype)
                loaded.add(id(slots[name]))
    missing = sorted(n for n, group in slots.items() if id(group) not in loaded and any(p for *_, p in group))
    if missing:
        raise BadEntry(f"{len(missing)} parameter(s) have no recipe, e.g. {missing[:4]}")
    model.hf_quantizer = None  # as the cold load leaves it (fxllm/models/embedded.py: _as_float_model)
    if data["generation_config"] is not None:
        model.generation_config = GenerationConfig.from_dict(data["generation_config"])
    return model.eval()


def load_tokenizer(entry: Entry) -> Any:
    """The entry's tokenizer, None when the file had none."""
    if not entry.data["tokenizer"]:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(entry.path), local_files_only=True)
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def load_entry(entry: Entry, path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """The model (on CPU) and tokenizer an entry describes; raises BadEntry when they cannot be built."""
    return build_model(entry, dtype, read_tensors(path, entry.data["tensors"])), load_tokenizer(entry)


def _tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(
        [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    )


def _alias_groups(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values())


def _generation(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "generation_config", None)
    return None if config is None else config.to_dict()


def model_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """The first way `b` differs from `a` (class, configs, tensor names / values / ties), or None."""
    return _config_difference(a, b) or tensors_difference(a, b)


def _config_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    if type(a) is not type(b):
        return f"class {type(a).__name__} != {type(b).__name__}"
    if a.config.to_dict() != b.config.to_dict():
        return "config differs"
    if getattr(a.config, "_attn_implementation", None) != getattr(b.config, "_attn_implementation", None):
        return "attention implementation differs"
    if _generation(a) != _generation(b):
        return "generation config differs"
    return None


def tensors_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """The first way `b`'s parameters and buffers differ from `a`'s (names and order, values, dtypes, ties)."""
    ta, tb = _tensors_of(a), _tensors_of(b)
    if list(ta) != list(tb):
        return f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}"
    for name, t in ta.items():
        if t.dtype != tb[name].dtype or t.shape != tb[name].shape or not torch.equal(t, tb[name]):
            return f"tensor {name} differs"
    if _alias_groups(ta) != _alias_groups(tb):
        return "tied tensors differ"
    return None


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """The first way tokenizer `b` differs from `a` (class, serialization, special tokens, outputs), or None."""
    if a is None or b is None:
        return None if a is b else "one tokenizer is None"
    checks = {
        "class": lambda t: type(t).__name__,
        "serialization": lambda t: t.backend_tokenizer.to_str(),
        "special tokens": lambda t: (
            t.special_tokens_map,
            t.all_special_ids,
            t.bos_token_id,
            t.eos_token_id,
            t.pad_token_id,
            t.unk_token_id,
        ),
        "added tokens": lambda t: {i: str(v) for i, v in t.added_tokens_decoder.items()},
        "chat template": lambda t: t.chat_template,
        "settings": lambda t: (
            t.clean_up_tokenization_spaces,
            t.model_max_length,
            t.padding_side,
            t.truncation_side,
            len(t),
        ),
        "encodings": lambda t: [t(text)["input_ids"] for text in _PROBE_TEXTS],
        "decodings": lambda t: [t.decode(t(text)["input_ids"]) for text in _PROBE_TEXTS],
        "chat": lambda t: (
            t.apply_chat_template(_PROBE_CHAT, tokenize=False, add_generation_prompt=True)
            if t.chat_template
            else None
        ),
    }
    for what, get in checks.items():
        if get(a) != get(b):
            return f"tokenizer {what} differs"
    return None


def weights_only_difference(
    model: Any, weights_only: Any, tensors: Callable[[Any, Any], str | None] | None = None
) -> str | None:
    """How the weights-only model differs from the real one where the compile cache's key looks, or None
    (`tensors`: how their tensors are compared, by default every value)."""
    if model_class_name(weights_only) != model_class_name(model):
        return f"class {model_class_name(weights_only)} != {model_class_name(model)}"
    if weights_only.config.to_dict() != model.config.to_dict() or _generation(weights_only) != _generation(
        model
    ):
        return "weights-only config differs"
    problem = (tensors or tensors_difference)(model, weights_only)
    return None if problem is None else f"weights-only {problem}"


def store_entry(
    cache: GgufCache, path: Path, reader: Any, model: Any, tokenizer: Any, dtype: torch.dtype,
    attn_implementation: str | None,
) -> Path | None:  # fmt: skip
    """Record the cold load of `path` (`model` on CPU, `tokenizer`) as a cache entry, published only when a
    load from it reproduces them exactly; returns the entry's directory, or None (logged why)."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    parts = key_parts(path, _dtype_name(dtype), attn_implementation)
    try:
        data = {
            "config": model.config.to_dict(),
            "attn_implementation": model.config._attn_implementation,
            "generation_config": model.generation_config.to_dict()
            if getattr(model, "generation_config", None) is not None
            else None,
            "tokenizer": tokenizer is not None,
            "tensors": tensor_recipes(reader, model),
            "model_class": model_class_name(model),
            "layout": model_layout(model),
        }
    except Unsupported as exc:
        logger.info("GGUF cache: %s is not cached: %s", path.name, exc)
        return None
    with tempfile.TemporaryDirectory(prefix="fxllm-gguf-") as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(model_buffers(model), str(Path(tmp) / BUFFERS_FILE))
        where = cache.write(parts, data, Path(tmp))
    if where is None:
        return None
    entry = cache.read(parts)
    problem = "it could not be read back" if entry is None else None
    if entry is not None:
        try:
            # Every recipe against the cold load on a sample of its rows (fxllm/models/gguf_check.py: a wrong
            # offset, type, shape or permutation shows in every sampled row), then both warm forms built
            # around the cold load's own tensors: each name must hold the very tensor of that name.
            cold = _tensors_of(model)
            recipes = entry.data["tensors"]
            problem = recipes_difference(path, recipes, cold)
            if problem is None:
                given = {r["name"]: cold[r["name"]] for r in recipes}
                real = build_model(entry, dtype, given)
                problem = _config_difference(model, real) or same_storage_difference(model, real)
                problem = problem or tokenizer_difference(tokenizer, load_tokenizer(entry))
                problem = problem or weights_only_difference(
                    model, WeightsOnlyModel(entry, dtype, given), same_storage_difference
                )
        except Exception as exc:  # anything a load from the entry trips over: no entry, the cold load stands
            problem = f"loading it failed ({type(exc).__name__}: {exc})"
    if problem is not None:
        logger.warning("GGUF cache: not keeping the entry of %s: a load from it differs from transformers' "
                       "(%s); every start parses the file", path.name, problem)  # fmt: skip
        shutil.rmtree(where, ignore_errors=True)
        return None
    logger.info("GGUF cache: stored %s (%d tensors, checked against the cold load in %.1f s)",
                where, len(data["tensors"]), time.perf_counter() - start)  # fmt: skip
    return where


def load_cached(
    cache: GgufCache,
    path: Path,
    dtype: torch.dtype,
    attn_implementation: str | None,
    weights_only: bool = False,
) -> tuple[Any, Any] | None:
    """The model (CPU) and tokenizer from `path`'s cache entry, or None (no entry, or a bad one: logged);
    with `weights_only`, a WeightsOnlyModel (fxllm/models/gguf_weights.py) instead of the HF model."""
    start = time.perf_counter()
    parts = key_parts(path, _dtype_name(dtype), attn_implementation)
    entry = cache.read(parts)
    if entry is None:
        return None
    try:
        if weights_only:
            loaded = weights_only_model(entry, path, dtype), load_tokenizer(entry)
        else:
            loaded = load_entry(entry, path, dtype)
    except Exception as exc:  # a bad entry never stops a start: the caller loads the file cold
        logger.warning("GGUF cache: entry %s is unusable (%s: %s); removing it and rebuilding",
                       entry.path, type(exc).__name__, exc)  # fmt: skip
        shutil.rmtree(entry.path, ignore_errors=True)
        return None
    logger.info("GGUF cache hit: %s loaded from %s in %.1f s (no metadata parse%s)", path.name, entry.path,
                time.perf_counter() - start, "; weights only" if weights_only else "")  # fmt: skip
    return loaded
