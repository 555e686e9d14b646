"""The Hugging Face folder (config + tokenizer + chat template) Dynamo's frontend reads for a model."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fxllm.models.embedded import EMBEDDED_ALIASES

logger = logging.getLogger(__name__)

# What Dynamo's frontend loads from a model folder to tokenize, apply the chat template and detokenize.
FRONTEND_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
# Part of the cached folder's name: bump it when the export writes something else, so no worker keeps
# serving an older folder. 2: the generation config's EOS is the tokenizer's.
EXPORT_VERSION = 2


def needs_export(model: str) -> bool:
    """True when `model` is the embedded model or a .gguf file: the frontend cannot read a GGUF."""
    return model.strip().lower() in EMBEDDED_ALIASES or model.endswith(".gguf")


def has_frontend_files(folder: Path) -> bool:
    """Whether `folder` already holds every file the frontend needs."""
    return all((folder / name).is_file() for name in FRONTEND_FILES)


def export_hf_tokenizer(
    tokenizer: Any, model_config: Any, generation_config: Any, architecture: str, out_dir: Path
) -> Path:
    """Write config.json, tokenizer.json, tokenizer_config.json (with the chat template inline) and
    generation_config.json for a loaded model into `out_dir`; returns it."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (a preset?): Dynamo's frontend needs one to tokenize")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: Dynamo needs a tokenizer.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 writes the template to chat_template.jinja; the frontend reads it from
    # tokenizer_config.json too, so put it there as older transformers did.
    template = getattr(tokenizer, "chat_template", None)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    if template:
        tok_config["chat_template"] = template
    # A loaded tokenizer reports an unbounded model_max_length (1e30), which overflows Dynamo's u64 parse.
    context = getattr(model_config, "max_position_embeddings", None)
    if isinstance(context, int):
        tok_config["model_max_length"] = context
    # The frontend stops at the tokenizer's EOS as well as the generation config's; fxllm's engine follows
    # the generation config only (as HF generate). A GGUF tokenizer may name another EOS (SmolLM2's says
    # <|im_start|>), so name the generation config's first EOS here and both stop at the same ids.
    eos = getattr(generation_config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos, int):
        tok_config["eos_token"] = tokenizer.convert_ids_to_tokens(eos)
        tok_config.pop("eos_token_id", None)
    # transformers 5 names its class TokenizersBackend, which older readers do not know.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    config = model_config.to_dict()
    config.pop("quantization_config", None)  # the GGUF dequantizer's: the weights are not shipped
    if not config.get("architectures"):
        # A GGUF-built config leaves it null; Dynamo's model card parser needs a list.
        config["architectures"] = [architecture]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if generation_config is not None:
        generation_config.save_pretrained(str(out_dir))
    logger.info("wrote the frontend's model folder (tokenizer, chat template, config) to %s", out_dir)
    return out_dir


def export_model_folder(model: str, out_dir: Path) -> Path:
    """Load MODEL's tokenizer and config (embedded, GGUF or HF folder) and write the frontend's folder."""
    from fxllm.models import load_model

    loaded = load_model(model)
    generation = getattr(loaded.model, "generation_config", None)
    return export_hf_tokenizer(
        loaded.tokenizer, loaded.config, generation, type(loaded.model).__name__, out_dir
    )


def export_model_folder_once(model: str, out_dir: Path) -> Path:
    """export_model_folder into a private folder renamed to `out_dir`: workers started together on one
    machine never read a half-written folder, and the first one to finish wins."""
    staging = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    export_model_folder(model, staging)
    try:
        staging.rename(out_dir)
    except OSError:  # another worker renamed its copy first: keep that one
        shutil.rmtree(staging, ignore_errors=True)
        if not has_frontend_files(out_dir):
            raise
    return out_dir
