"""FP8 checkpoint layers: `Fp8Linear` holds a layer's e4m3 weight and scales as loaded, and calls
`fxllm::fp8_linear`, so the captured graph carries the canonical op and the weights stay FP8.

The loader swaps the meta-initialised model's nn.Linear modules for these before streaming the
safetensors (`swap_fp8_linears_`), each tensor lands in its slot through `fxllm_adapt_tensor` (checked,
never cast to the model's dtype), and the checkpoint's `k_scale` / `v_scale` become the FP8 KV cache's
scales (`read_kv_scales`, `model.fxllm_kv_scales`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

import fxllm.ops.fp8_linear  # noqa: F401  (defines fxllm::fp8_linear)
from fxllm.ops.kv_quant import KV_SCALES_ATTR, scale_tensor
from fxllm.quantization.checkpoint import Fp8Checkpoint, Fp8CheckpointError, Fp8LayerScheme
from fxllm.quantization.fp8 import BLOCK, FP8_DTYPE

logger = logging.getLogger(__name__)

# k_scale / v_scale as compressed-tensors (`self_attn.k_scale`), ModelOpt (`self_attn.k_proj.k_scale`) and
# vLLM-converted checkpoints (`self_attn.attn.k_scale`) name them.
_KV_SCALE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.)?(?:[kv]_proj\.|attn\.)?([kv])_scale$")


def is_kv_scale_key(key: str) -> bool:
    """Whether a checkpoint tensor name is an attention layer's k_scale or v_scale."""
    return _KV_SCALE_RE.search(key) is not None


def _scale_shape(scheme: Fp8LayerScheme, n: int, k: int) -> tuple[int, ...]:
    if scheme.weight == "channel":
        return (n, 1)
    if scheme.weight == "tensor":
        return (1,)
    return (-(-n // BLOCK), -(-k // BLOCK))


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class Fp8Linear(nn.Module):
    """A linear layer stored as in an FP8 checkpoint: e4m3 weight [N, K], float32 scales, bias in the model's dtype."""

    def __init__(self, name: str, linear: nn.Linear, scheme: Fp8LayerScheme, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = linear.out_features, linear.in_features
        self.name, self.scheme, self.dtype = name, scheme, dtype
        self.in_features, self.out_features = k, n
        self.weight = _meta((n, k), FP8_DTYPE)
        self.weight_scale = _meta(_scale_shape(scheme, n, k), torch.float32)
        self.input_scale = _meta((1,), torch.float32) if scheme.activations == "static_tensor" else None
        self.bias = _meta((n,), dtype) if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """The canonical FP8 GEMM (the lowering picks its kernel)."""
        if self.scheme.activations == "dynamic_tensor":  # the scheme rides on the op (merging must see it)
            return torch.ops.fxllm.fp8_linear(
                x, self.weight, self.weight_scale, self.bias, self.input_scale, True
            )
        return torch.ops.fxllm.fp8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Fp8Linear:  # type: ignore[override]
        # Module.to(dtype) / .half() cast every floating tensor, e4m3 included: learn fn's target from a
        # probe, then only move the e4m3 weight and float32 scales (the bias follows the model's dtype).
        probe = fn(torch.zeros(0, device=self.weight.device))
        for leaf in ("weight", "weight_scale", "input_scale"):
            param = self._parameters.get(leaf)
            if param is not None:
                self._parameters[leaf] = nn.Parameter(param.to(probe.device), requires_grad=False)
        if self.bias is not None:
            self._parameters["bias"] = nn.Parameter(fn(self.bias), requires_grad=False)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        """Shape and scheme, for print(model)."""
        return f"{self.in_features} -> {self.out_features}, {self.scheme.weight} weights, {self.scheme.activations}"

    def fxllm_adapt_tensor(self, leaf: str, tensor: Tensor, key: str) -> Tensor:
        """A checkpoint tensor for slot `leaf`, checked and shaped like the slot (never dequantized)."""
        n, k = self.out_features, self.in_features
        if leaf == "weight":
            if tensor.dtype != FP8_DTYPE:
                raise Fp8CheckpointError(
                    f"checkpoint tensor {key!r} is {tensor.dtype}; the checkpoint's quantization config makes "
                    f"{self.name} an FP8 layer, which needs a float8_e4m3fn weight"
                )
            return tensor
        if leaf == "bias":
            return tensor.to(self.dtype)
        if not tensor.is_floating_point() or tensor.dtype == FP8_DTYPE:
            raise Fp8CheckpointError(f"checkpoint tensor {key!r} is {tensor.dtype}; a scale must be a float")
        scale = tensor.to(torch.float32)
        expected = self.weight_scale.shape if leaf == "weight_scale" else (1,)
        if scale.numel() == 1 and len(expected) == 1:
            return scale.reshape(1)
        if leaf == "weight_scale" and self.scheme.weight == "channel" and scale.numel() == n:
            return scale.reshape(n, 1)
        if tuple(scale.shape) == tuple(expected):
            return scale
        raise Fp8CheckpointError(
            f"checkpoint tensor {key!r} has shape {tuple(scale.shape)}; a {self.scheme.weight} {leaf} of the "
            f"{n} x {k} layer {self.name} has shape {list(expected)}"
        )


def swap_fp8_linears_(model: nn.Module, checkpoint: Fp8Checkpoint, dtype: torch.dtype) -> int:
    """Replace every nn.Linear the checkpoint stores in FP8 by an (empty) Fp8Linear; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        scheme = checkpoint.scheme_for(name, type(module).__name__)
        if scheme is None:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        setattr(owner, leaf, Fp8Linear(name, module, scheme, dtype))
        swapped += 1
    if swapped == 0:
        raise Fp8CheckpointError(f"{checkpoint.describe()}, but it makes no linear layer of the model FP8")
    return swapped


def read_kv_scales(files: list[Path], num_layers: int | None) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (k_scale, v_scale)} from the checkpoint's tensors; a layer with one of the two fails."""
    found: dict[int, dict[str, Tensor]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                match = _KV_SCALE_RE.search(key)
                if match is None:
                    continue
                layer = int(match.group(1))
                if num_layers is not None and layer >= num_layers:
                    continue
                try:
                    value = scale_tensor(f.get_tensor(key))
                except ValueError as e:
                    raise Fp8CheckpointError(f"checkpoint tensor {key!r}: {e}") from e
                found.setdefault(layer, {})[match.group(2)] = value
    scales = {}
    for layer, pair in sorted(found.items()):
        if set(pair) != {"k", "v"}:
            missing = "v_scale" if "k" in pair else "k_scale"
            raise Fp8CheckpointError(
                f"layer {layer} has a {'k' if 'k' in pair else 'v'}_scale but no {missing}"
            )
        scales[layer] = (pair["k"], pair["v"])
    return scales


def attach_kv_scales_(
    model: nn.Module, checkpoint: Fp8Checkpoint, files: list[Path], num_layers: int | None
) -> None:
    """Put the checkpoint's KV scales on `model` (`fxllm_kv_scales`) for the FP8 KV cache; fail if some are missing."""
    scales = read_kv_scales(files, num_layers)
    if checkpoint.kv_cache is None and not scales:
        return
    expected = (
        num_layers
        if num_layers is not None
        else getattr(getattr(model, "config", None), "num_hidden_layers", 0)
    )
    missing = [layer for layer in range(expected or 0) if layer not in scales]
    if checkpoint.kv_cache is not None and missing:
        raise Fp8CheckpointError(
            f"the checkpoint's config declares an FP8 KV cache, but layers {missing[:8]} have no k_scale / v_scale"
        )
    setattr(model, KV_SCALES_ATTR, scales)
    logger.info(
        "checkpoint KV scales for %d layer(s): used with cache.dtype=fp8 (auto keeps the model's dtype)",
        len(scales),
    )
