"""Typed configuration for every Encore process (stdlib only).

One frozen dataclass per concern; every field has a default and a one-line doc in its
``metadata["help"]`` (the CLI builds its flags from them). ``EncoreConfig`` groups them.
Values come, lowest to highest precedence, from defaults, a YAML preset, ``ENCORE_*``
environment variables, and CLI flags; :func:`configs.loading.build_config` does the merge.
"""

from encore.configs.fields import ConfigError
from encore.configs.types import (
    CacheConfig,
    EncoreConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    WorkerConfig,
)

__all__ = [
    "CacheConfig",
    "ConfigError",
    "EncoreConfig",
    "ModelConfig",
    "SchedulerConfig",
    "ServerConfig",
    "WorkerConfig",
]
