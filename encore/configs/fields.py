"""Field helpers: documented fields, string coercion and validation with clear errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def opt(default: Any, help: str, *, repeat: bool = False) -> Any:
    """A config field with a default and a one-line doc (shown by ``encore serve --help``)."""
    if isinstance(default, list | dict):
        def copy() -> Any:
            return type(default)(default)

        return dataclasses.field(default_factory=copy, metadata={"help": help, "repeat": repeat})
    return dataclasses.field(default=default, metadata={"help": help, "repeat": repeat})


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass."""
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(owner: str, name: str, tp: Any, value: Any) -> Any:
    """Turn ``value`` (a string from env/CLI, or a YAML scalar) into ``tp``; ConfigError if bad."""
    where = f"{owner}.{name}"
    optional, inner = _is_optional(tp)
    empty = isinstance(value, str) and value.lower() in ("", "none")
    if value is None or (optional and empty):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = get_origin(inner)
    if origin is Literal:
        allowed = get_args(inner)
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is list:
        (item_tp,) = get_args(inner)
        items = value.split(",") if isinstance(value, str) else list(value)
        return [coerce(owner, name, item_tp, v.strip() if isinstance(v, str) else v)
                for v in items if v != ""]
    if inner is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}={value!r} is not a boolean; use true or false")
    if inner in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} is not a number")
        try:
            return inner(value)
        except (TypeError, ValueError):
            kind = "an integer" if inner is int else "a number"
            raise ConfigError(f"{where}={value!r} is not {kind}") from None
    if inner is str:
        return str(value)
    return value


def check_range(owner: str, name: str, value: float | int | None, *, lo: float | None = None,
                hi: float | None = None) -> None:
    """Raise ConfigError unless lo <= value <= hi (None bounds are open; None value passes)."""
    if value is None:
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{owner}.{name}={value!r} is out of range; allowed {bounds}")
