"""Block and chunk keys: keyed digests, deterministic across processes and restarts.

    block i key = H(secret; "block", parent_key, extra, tokens of block i)
                  parent_key = key of block i-1 (empty for block 0)
                  extra      = tenant salt for block 0, empty otherwise
    chunk key   = H(secret; "chunk", salt, tokens)          (position-free)

H is keyed BLAKE2b (32-byte digest) or HMAC-SHA-256, keyed with a per-deployment secret so
keys cannot be forged or probed across deployments. Every field is length-prefixed so no two
different inputs share a byte string. Tokens are packed as little-endian uint32. Never Python
``hash()``: it is salted per process, and the same key must address a GPU block, a CPU slot
and an SSD file after a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Literal

HashAlgorithm = Literal["blake2b", "sha256"]

# A fixed secret for development and tests only. Deployments pass their own secret so that
# keys (which may land on shared SSDs) are unguessable to other tenants and deployments.
DEV_SECRET = b"encore-dev-secret:not-for-production"

KEY_BYTES = 32
_BLAKE2B_MAX_KEY = 64

if array("I").itemsize != 4:  # pragma: no cover - every mainstream platform has 4-byte 'I'
    raise ImportError("kvmanager.hashing needs a 4-byte array('I') to pack token ids")


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (raises OverflowError outside [0, 2**32))."""
    packed = array("I", tokens)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def salt_extra(salt: str | None) -> bytes:
    """The ``extra`` bytes of a sequence's first block: its tenant salt (empty when none)."""
    return b"" if salt is None else b"salt:" + salt.encode("utf-8")


class BlockHasher:
    """Computes block keys and chunk keys with one secret and one algorithm."""

    def __init__(self, secret: bytes = DEV_SECRET, algorithm: HashAlgorithm = "blake2b") -> None:
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("the KV hashing secret must be non-empty bytes")
        self.algorithm = algorithm
        self._new = _digest_factory(secret, algorithm)

    def block_key(self, parent: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
        """Key of a full block whose predecessor has key ``parent`` (None for block 0)."""
        h = self._new()
        h.update(_block_message(parent or b"", extra, pack_tokens(tokens)))
        return bytes(h.digest())

    def chunk_key(self, salt: str | None, tokens: Sequence[int]) -> bytes:
        """Position-free key of a chunk of tokens (for blended chunk reuse)."""
        h = self._new()
        h.update(b"chunk")
        _field(h, salt_extra(salt))
        _field(h, pack_tokens(tokens))
        return bytes(h.digest())

    def prefix_keys(
        self,
        tokens: Sequence[int],
        block_size: int,
        salt: str | None,
        known: Sequence[bytes] = (),
        num_blocks: int | None = None,
    ) -> list[bytes]:
        """Chained keys of the full blocks of ``tokens`` (at most ``num_blocks`` of them).

        ``known`` are keys already computed for the first blocks; they are reused, not redone.
        """
        limit = len(tokens) // block_size
        if num_blocks is not None:
            limit = min(limit, num_blocks)
        keys = list(known[:limit])
        first = len(keys)
        # ``block_key`` of each block, with the tokens packed once (a prompt of thousands of
        # blocks is hashed each time a request arrives)
        packed = pack_tokens(tokens[first * block_size : limit * block_size])
        width = block_size * 4
        new = self._new
        parent = keys[-1] if keys else b""
        for i in range(limit - first):
            h = new()
            extra = salt_extra(salt) if first + i == 0 else b""
            h.update(_block_message(parent, extra, packed[i * width : (i + 1) * width]))
            parent = bytes(h.digest())
            keys.append(parent)
        return keys


def _block_message(parent: bytes, extra: bytes, packed: bytes) -> bytes:
    """What a block key hashes: "block" and the length-prefixed parent key, extra bytes and
    packed tokens."""
    return b"".join((b"block", len(parent).to_bytes(4, "little"), parent,
                     len(extra).to_bytes(4, "little"), extra,
                     len(packed).to_bytes(4, "little"), packed))


def _field(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(4, "little"))
    h.update(data)


def _digest_factory(secret: bytes, algorithm: str) -> Callable[[], Any]:
    if algorithm == "blake2b":
        key = secret if len(secret) <= _BLAKE2B_MAX_KEY else hashlib.blake2b(secret).digest()
        return lambda: hashlib.blake2b(key=key, digest_size=KEY_BYTES)
    if algorithm == "sha256":
        return lambda: hmac.new(secret, digestmod=hashlib.sha256)
    raise ValueError(f"hash_algorithm={algorithm!r} is not supported; choose 'blake2b' or 'sha256'")
