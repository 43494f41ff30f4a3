"""Merge defaults, a preset mapping, ENCORE_* environment variables and overrides.

Field names are unique across sections, so flat keys (``block_size``) work everywhere:
in presets (flat or sectioned), as ``ENCORE_BLOCK_SIZE``, and as ``--block-size``.
Parsing YAML is the caller's job (this package is stdlib-only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from encore.configs.fields import ConfigError, coerce, field_types
from encore.configs.types import SECTIONS, EncoreConfig

ENV_PREFIX = "ENCORE_"


def field_registry() -> dict[str, tuple[str, type, dataclasses.Field]]:
    """Flat field name -> (section, section class, field), for flags and env vars."""
    out: dict[str, tuple[str, type, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section, cls, f)
    return out


def env_var_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _flatten(preset: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in preset.items():
        if key in SECTIONS and isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def build_config(preset: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> EncoreConfig:
    """Resolve one EncoreConfig; raise ConfigError naming the field on any bad value."""
    registry = field_registry()
    values: dict[str, Any] = {}
    for key, value in _flatten(preset or {}).items():
        if key not in registry:
            raise ConfigError(f"unknown config field {key!r} in preset")
        values[key] = value
    for name in registry:
        var = env_var_name(name)
        if env is not None and var in env:
            values[name] = env[var]
    for key, value in (overrides or {}).items():
        if key not in registry:
            raise ConfigError(f"unknown config field {key!r}")
        values[key] = value
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, raw in values.items():
        section, cls, f = registry[name]
        per_section[section][name] = coerce(section, name, field_types(cls)[name], raw)
    try:
        return EncoreConfig(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})
    except TypeError as e:  # pragma: no cover - guarded by the registry
        raise ConfigError(str(e)) from None
