"""Engine set-up helpers: the EOS ids that end generation, and the device and dtype to run on."""

from __future__ import annotations

from typing import Any

import torch

from fxllm.dtypes import is_auto_dtype, parse_dtype


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(t) for t in value]


def resolve_eos_token_ids(generation_config: Any, tokenizer: Any, model_config: Any) -> list[int]:
    """Every id that ends generation, "the" EOS first; [] when nothing declares one.

    Hugging Face's generate stops at the generation config's EOS ids (SmolLM2: <|im_end|>, Llama-3.1
    Instruct: 128001, 128008 and 128009), which can differ from the tokenizer's; follow it so outputs
    match generate. Without one, the tokenizer's EOS and the model config's (maybe a list) both end it.
    The tokenizer's EOS goes first where listed, so it reports stop_reason None as in vLLM.
    """
    ids = _token_ids(getattr(generation_config, "eos_token_id", None))
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if not ids:
        ids = _token_ids(tokenizer_eos) + _token_ids(getattr(model_config, "eos_token_id", None))
    ids = list(dict.fromkeys(ids))
    if isinstance(tokenizer_eos, int) and tokenizer_eos in ids:
        ids.remove(tokenizer_eos)
        ids.insert(0, tokenizer_eos)
    return ids


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """'auto' -> cuda/bfloat16 when a GPU is present, else cpu/float32."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if is_auto_dtype(dtype):
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, parse_dtype(dtype, auto_allowed=True)
