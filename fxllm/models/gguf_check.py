"""The GGUF cache entry's write-time check of its tensor recipes, on a sample of every tensor.

A recipe (fxllm/models/gguf_fastload.py: offset, byte count, ggml type, data shape, q/k head permutation)
goes wrong as a whole: a wrong offset, type or shape changes every row of the tensor, a wrong permutation
every row but the first and last of each head, a wrong name or ordering the tensor under a name. So each
tensor is de-quantized on a strided sample of its rows (the first, the second, the last, and every
`step`-th with `step` odd, so a stride never lands on head boundaries only) and compared bit for bit with
the cold load's rows; its full shape and dtype are compared without de-quantizing the rest. Checking every
element instead (de-quantize all 272 tensors of SmolLM2 and compare them twice) was 19 of the check's 24 s
at load 7.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxllm.models.gguf_cache import BadEntry

SAMPLE_ROWS = 32  # strided rows per tensor (plus the first, second and last): ~0.1-6% of each tensor


def sample_rows(rows: int) -> list[int]:
    """The rows of a `rows`-row tensor the check compares: 0, 1, the last, and an odd stride through it."""
    step = max(1, rows // SAMPLE_ROWS) | 1
    return sorted({0, min(1, rows - 1), rows - 1, *range(2, rows, step)})


def _source_rows(rows: int, permute_heads: int | None) -> np.ndarray:
    """For each row of the HF tensor, the row of the file's tensor it comes from (transformers' q/k un-permute)."""
    if permute_heads is None:
        return np.arange(rows)
    from fxllm.models.gguf_fastload import _reverse_permute

    return _reverse_permute(torch.arange(rows), permute_heads).numpy()


def _bits(t: torch.Tensor) -> np.ndarray:
    """`t`'s bit patterns as unsigned integers (bit-exact equality, NaN included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def recipe_difference(raw: np.ndarray, recipe: dict[str, Any], expected: torch.Tensor) -> str | None:
    """How the tensor `recipe` reads from the file (`raw`: its bytes) differs from `expected` (the cold load's):
    shape, dtype, or the values of the sampled rows; None when they agree."""
    from fxllm.models.gguf_dequant import dequantize

    name = recipe["name"]
    end = recipe["offset"] + recipe["nbytes"]
    if end > raw.size:
        raise BadEntry(f"tensor {recipe['gguf']} ends at byte {end}, past the file's {raw.size}")
    data = raw[recipe["offset"] : end].view(np.dtype(recipe["data_dtype"])).reshape(recipe["data_shape"])
    # ggml blocks run along the last dimension: every row de-quantizes on its own.
    matrix = data.reshape(-1, data.shape[-1])
    rows = sample_rows(matrix.shape[0])
    sources = _source_rows(matrix.shape[0], recipe["permute_heads"])[rows]
    values = dequantize(np.ascontiguousarray(matrix[sources]), recipe["ggml_type"])
    shape = (*data.shape[:-1], values.shape[-1])
    if tuple(expected.shape) != shape:
        return f"tensor {name} differs (shape {shape} in the file, {tuple(expected.shape)} loaded)"
    if not expected.is_floating_point():
        return f"tensor {name} differs (dtype {expected.dtype} loaded)"
    # Rows gathered and compared in numpy: torch's indexing waits on its intra-op threads on a busy box
    # (SmolLM2's 272 tensors: 2.3-3.0 s with 2 threads, 0.2-0.3 s with 1, at load 3.5).
    loaded = _bits(expected.detach().reshape(-1, shape[-1]))[rows]
    if not np.array_equal(_bits(values.to(expected.dtype)), loaded):  # the warm load's cast to the dtype
        return f"tensor {name} differs (values of sampled rows)"
    return None


def recipes_difference(
    path: Path, recipes: list[dict[str, Any]], tensors: dict[str, torch.Tensor]
) -> str | None:
    """The first recipe whose tensor, read from `path`, differs from the cold load's `tensors` (by HF name)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for recipe in recipes:
        expected = tensors.get(recipe["name"])
        if expected is None:
            return f"tensor {recipe['name']} is not in the loaded model"
        problem = recipe_difference(raw, recipe, expected)
        if problem is not None:
            return problem
    return None


def same_storage_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """How `b` (built from `a`'s own parameters) holds them differently: names, order, shapes, dtypes, each
    parameter the very tensor of the same name in `a`, buffers equal, ties; None when it holds them alike."""
    from fxllm.models.gguf_fastload import _alias_groups, _tensors_of

    ta, tb = _tensors_of(a), _tensors_of(b)
    if list(ta) != list(tb):
        return f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}"
    params = {name for name, _ in a.named_parameters(remove_duplicate=False)}
    for name, t in ta.items():
        u = tb[name]
        if t.dtype != u.dtype or t.shape != u.shape:
            return f"tensor {name} differs"
        same = t.data_ptr() == u.data_ptr() and t.stride() == u.stride()
        if not (same if name in params else torch.equal(t, u)):
            return f"tensor {name} differs"
    if _alias_groups(ta) != _alias_groups(tb):
        return "tied tensors differ"
    return None
