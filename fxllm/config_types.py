"""Strict type checks of config values against their dataclass field hints (no dependency needed).

The GPU machine has torch but not pydantic, and the hints config.yml uses are few: bool, int, float,
str, `X | None`, `list[X]` and `dict[K, V]`. Strict means "abc", "1", 1.5 and True are no int and
"yes" is no bool (YAML already turns `yes` into True); an int is accepted for a float and becomes one.
"""

from __future__ import annotations

import types
import typing
from typing import Any


class ConfigTypeError(ValueError):
    """A value does not have its field's type; `where` locates it inside a list or dict ("[1]")."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def type_name(hint: Any) -> str:
    """A readable name of a type hint: int, int | None, list[int]."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_value(hint: Any, value: Any, where: str = "") -> Any:
    """`value` as `hint` (a float field turns an int into a float), or ConfigTypeError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return check_value(option, value, where)
            except ConfigTypeError as error:
                errors.append(error)
        deepest = max(errors, key=lambda e: len(e.where))
        raise ConfigTypeError(str(deepest), deepest.where)
    if hint is type(None):
        if value is None:
            return None
        raise ConfigTypeError("input should be null", where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigTypeError("input should be a list", where)
        (item,) = typing.get_args(hint) or (Any,)
        return [check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError("input should be a mapping", where)
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {
            check_value(key_hint, k, f"{where}[{k!r}]"): check_value(value_hint, v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigTypeError("input should be a valid number", where)
    if isinstance(hint, type):
        # bool is an int in Python: an int field must not take True, a bool field not 1.
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigTypeError(f"input should be a valid {hint.__name__}", where)
    raise ConfigTypeError(f"unsupported field type {type_name(hint)}", where)
