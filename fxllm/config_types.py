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


# Value checks of single fields (config.py's _VALUE_CHECKS): each raises ValueError saying what is allowed.
def check_auto_on_off(value: str | bool) -> None:
    """auto, on or off (YAML's on/off arrive as booleans)."""
    if not isinstance(value, bool) and value not in ("auto", "on", "off"):
        raise ValueError(f"must be auto, on or off, got {value!r}")


def check_on_off(value: str | bool) -> None:
    """on or off (YAML's on/off arrive as booleans)."""
    if not isinstance(value, bool) and value not in ("on", "off"):
        raise ValueError(f"must be on or off, got {value!r}")


def check_positive(value: int) -> None:
    """At least 1."""
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")


def check_non_negative(value: float) -> None:
    """At least 0."""
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def check_rate(value: float) -> None:
    """Between 0 and 1."""
    if not 0 <= value <= 1:
        raise ValueError(f"must be between 0 and 1, got {value}")


def one_of(*allowed: str) -> typing.Callable[[Any], None]:
    """A check that `value` is one of `allowed`."""

    def check(value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")

    return check
