"""The deployment secret: block-key secret and tenant salts derive from it (stdlib only).

With a disk KV tier the secret lives in ``<disk_cache_dir>/secret`` (32 random bytes, created
once, mode 0600), so block keys and tenant salts stay the same across restarts and the cache
on disk stays addressable. Without a disk tier each process draws its own random secret:
nothing outlives the process, so nothing needs to match.

    secret ──HMAC("encore block keys")──► kvmanager BlockHasher secret   (P1)
           ──HMAC("encore tenant salts")─► per-API-key cache salt         (P0)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SECRET_FILE = "secret"
SECRET_BYTES = 32
_PROCESS_SECRET = os.urandom(SECRET_BYTES)


def deployment_secret(disk_cache_dir: str | None) -> bytes:
    """The persistent secret of ``disk_cache_dir`` (created on first use), else a
    per-process random one. Safe when several processes create it at once. An unusable
    directory is not fatal (the disk tier turns itself off): the process secret is used."""
    if disk_cache_dir is None:
        return _PROCESS_SECRET
    path = Path(disk_cache_dir) / SECRET_FILE
    try:
        if not path.exists():
            _create_once(path)
        data = path.read_bytes()
    except OSError as e:
        logger.warning("cannot use %s (%s); the KV cache will not survive a restart", path, e)
        return _PROCESS_SECRET
    if len(data) != SECRET_BYTES:
        raise ValueError(f"{path} is not a {SECRET_BYTES}-byte Encore secret; remove it to "
                         "start a fresh cache")
    return data


def _create_once(path: Path) -> None:
    """Write a fresh secret under a temp name and hard-link it into place (first one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)
    tmp.unlink()


def derive(secret: bytes, purpose: str) -> bytes:
    """A sub-secret for one purpose (HMAC-SHA-256), so uses never share raw key material."""
    return hmac.new(secret, purpose.encode(), hashlib.sha256).digest()


def block_key_secret(disk_cache_dir: str | None) -> bytes:
    return derive(deployment_secret(disk_cache_dir), "encore block keys")


def disk_mac_key(cache: Any) -> bytes:
    """The key that authenticates the disk tier's files (``cache``: the ``CacheConfig``)."""
    return derive(deployment_secret(cache.disk_cache_dir), "encore kv file mac")


def tenant_salt(secret: bytes, api_key: str) -> str:
    """The cache salt of the tenant owning ``api_key`` (hex; the key itself never leaks)."""
    digest = hmac.new(derive(secret, "encore tenant salts"), api_key.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]
