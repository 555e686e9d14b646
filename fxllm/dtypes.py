"""The one parser of model dtype names: the config, the CLI, the loader and the engine all use it."""

from __future__ import annotations

import torch

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

ACCEPTED_DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPE_NAMES)


def is_auto_dtype(name: str) -> bool:
    """Whether `name` is "auto" (any case): the caller picks its own default dtype then."""
    return name.strip().lower() == "auto"


def parse_dtype(name: str, *, auto_allowed: bool = False) -> torch.dtype:
    """float32/fp32/float, bfloat16/bf16, float16/fp16/half (any case, "torch." prefix ok) -> torch.dtype.

    "auto" is the caller's to handle (check `is_auto_dtype` first); `auto_allowed` only adds it to the
    error message's list of accepted names.
    """
    if not isinstance(name, str):
        raise TypeError(f"a dtype name must be a string, got {type(name).__name__} {name!r}")
    dtype = _DTYPE_NAMES.get(name.strip().lower().removeprefix("torch."))
    if dtype is None:
        accepted = ", ".join(("auto", *ACCEPTED_DTYPE_NAMES) if auto_allowed else ACCEPTED_DTYPE_NAMES)
        raise ValueError(f"unknown dtype {name!r}; use one of {accepted} (any case)")
    return dtype
