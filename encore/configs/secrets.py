"""The deployment secret: block keys, tenant salts and stored blocks' MACs derive from it.

Where it comes from, first found wins:

1. ``ENCORE_DEPLOYMENT_SECRET`` (environment; any string of at least 16 characters),
2. ``deployment_secret_file`` (a file of at least 16 bytes, e.g. a mounted secret),
3. with a disk KV tier, ``<disk_cache_dir>/secret`` (32 random bytes, created once, 0600),
4. else a random secret per process: nothing outlives the process, so nothing must match.

Replicas of a fleet share 1 or 2, so they derive the same block keys and tenant salts and can
share the remote tier; a replica with another secret derives other keys, and the remote
tier's namespace names the secret too, so their entries never mix. Stdlib only.

    secret ──HMAC("encore block keys")──► kvmanager BlockHasher secret   (P1)
           ──HMAC("encore tenant salts")─► per-API-key cache salt         (P0)
           ──HMAC("encore kv file mac")──► MAC of disk files / remote values (P2)
           ──HMAC("encore remote namespace")► the remote tier's key prefix  (P2)
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


SECRET_ENV = "ENCORE_DEPLOYMENT_SECRET"
MIN_SECRET_CHARS = 16


def deployment_secret(cache: Any) -> bytes:
    """The deployment secret (module docstring) for ``cache`` (a ``CacheConfig``). A secret
    that is set but unusable (too short, unreadable file) is an error, not a fallback."""
    env = os.environ.get(SECRET_ENV)
    if env is not None:
        return _from_text(env.strip(), SECRET_ENV)
    if cache.deployment_secret_file:
        return _from_file(Path(cache.deployment_secret_file))
    return _disk_secret(cache.disk_cache_dir)


def _from_text(text: str | bytes, where: str) -> bytes:
    if len(text) < MIN_SECRET_CHARS:
        raise ValueError(f"{where}: a deployment secret needs at least {MIN_SECRET_CHARS} "
                         "characters")
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(b"encore deployment secret\0" + data).digest()


def _from_file(path: Path) -> bytes:
    try:
        data = path.read_bytes().strip()
    except OSError as e:
        raise ValueError(f"deployment_secret_file {str(path)!r}: {e.strerror or e}") from None
    return _from_text(data, f"deployment_secret_file {str(path)!r}")


def _disk_secret(disk_cache_dir: str | None) -> bytes:
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


def block_key_secret(cache: Any) -> bytes:
    return derive(deployment_secret(cache), "encore block keys")


def disk_mac_key(cache: Any) -> bytes:
    """The key that authenticates stored blocks (disk files, remote values)."""
    return derive(deployment_secret(cache), "encore kv file mac")


def remote_namespace_id(cache: Any) -> str:
    """Names the secret in the remote tier's key prefix (no secret material leaks)."""
    return derive(deployment_secret(cache), "encore remote namespace")[:8].hex()


def tenant_salt(secret: bytes, api_key: str) -> str:
    """The cache salt of the tenant owning ``api_key`` (hex; the key itself never leaks)."""
    digest = hmac.new(derive(secret, "encore tenant salts"), api_key.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]
