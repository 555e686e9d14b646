"""Upper bounds on a step's sizes that Inductor assumed while compiling the standalone graph, and their
check on every call.

Inductor's Triton code generation indexes with 32-bit integers where a tensor's element count fits, and
records that as a shape guard: `4096*tokens <= 2147483647` (hidden 4096), `128256*rows <= 2147483647`
(the logits of a 128k vocabulary), seen on the H100 for the 8B preset (torch 2.11, 2026-11-28). Dynamo
would check such guards per call and recompile with 64-bit indexing when one fails; the standalone
artifact has no guards. So the guards are turned into one limit per step size (tokens, sequences,
block-table width, sampled rows, pool blocks), stored with the artifact, and every call compares its
sizes with them (a few integer comparisons). A guard that is anything else than an upper bound on a
single size still means "one artifact cannot serve every step" (`ShapeAssumption`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from fxllm.passes.runtime_signature import RuntimeSignature

# Where each named step size is read from one call's arguments: (input role, dimension).
SIZE_SOURCES: dict[str, tuple[str, int]] = {
    "tokens": ("input_ids", -1),
    "seqs": ("seq_lens", 0),
    "blocks_per_seq": ("block_tables", 1),
    "rows": ("logits_indices", 0),
    "num_blocks": ("k_cache", 0),
}


class ShapeAssumption(RuntimeError):
    """Inductor's compile assumed something about a size (a shape guard): one artifact cannot serve all steps."""


def _upper_bound(guard: Any) -> tuple[sympy.Symbol, int] | None:
    """(symbol, largest allowed value) where `guard` is `a*s + b <= 0` (or `<`, or flipped) with a > 0."""
    if isinstance(guard, (sympy.Le, sympy.Lt)):
        diff, strict = guard.lhs - guard.rhs, isinstance(guard, sympy.Lt)
    elif isinstance(guard, (sympy.Ge, sympy.Gt)):
        diff, strict = guard.rhs - guard.lhs, isinstance(guard, sympy.Gt)
    else:
        return None
    if len(diff.free_symbols) != 1:
        return None
    (symbol,) = diff.free_symbols
    try:
        poly = sympy.Poly(diff, symbol)
    except sympy.PolynomialError:
        return None
    if poly.degree() != 1:
        return None
    a, b = poly.all_coeffs()
    if not (a.is_Integer and b.is_Integer and a > 0):
        return None
    a, b = int(a), int(b)
    return symbol, (-(b // a) - 1 if strict else (-b) // a)


def limits_from_guards(guards: Sequence[Any], symbols: Mapping[str, sympy.Symbol]) -> dict[str, int]:
    """Per step-size name, the largest value every guard allows; ShapeAssumption for any other kind of guard."""
    names = {symbol: name for name, symbol in symbols.items()}
    limits: dict[str, int] = {}
    others = []
    for guard in guards:
        bound = _upper_bound(guard)
        if bound is None or bound[0] not in names:
            others.append(str(guard))
            continue
        name = names[bound[0]]
        limits[name] = min(limits.get(name, bound[1]), bound[1])
    if others:
        raise ShapeAssumption(f"Inductor's compile assumed {others[:5]} about the step's sizes")
    return limits


@dataclass(frozen=True)
class SizeCheck:
    """One limit: argument `index`'s size along `dim` (the step size `name`) may be at most `limit`."""

    name: str
    index: int
    dim: int
    limit: int


def size_checks(signature: RuntimeSignature, limits: Mapping[str, int]) -> list[SizeCheck]:
    """The per-call comparisons for `limits` over a graph with this runtime signature."""
    roles = [inp.role for inp in signature.inputs]
    checks = []
    for name, limit in sorted(limits.items()):
        role, dim = SIZE_SOURCES[name]
        if role in roles:
            checks.append(SizeCheck(name, roles.index(role), dim, limit))
    return checks


def first_violation(checks: Sequence[SizeCheck], args: Sequence[torch.Tensor]) -> SizeCheck | None:
    """The first limit these arguments exceed, or None."""
    for check in checks:
        if args[check.index].shape[check.dim] > check.limit:
            return check
    return None
