"""The disk KV tier's files: one file per block key, a checked header, atomic writes.

    <root>/kv/<key[:2] hex>/<key hex>.kv
    ┌──────────────── header (96 bytes, little-endian) ────────────────┐┌── payload ──┐
    │ magic "ENCOREKV" │ version u32 │ fingerprint 32B │ key 32B │      ││ one block's  │
    │ payload length u64 │ crc32 of payload u32 │ reserved u32          ││ K/V, all     │
    └───────────────────────────────────────────────────────────────────┘│ layers       │

The fingerprint names the model and the KV layout (shape, dtype, block size): a file of
another model is never loaded. Files are written under a temp name and renamed, so a reader
sees a whole file or none. A short, corrupt or foreign file is a miss: it is deleted and
counted. The index of valid files is rebuilt from the directory at start-up (oldest first),
so the cache survives restarts. Pure stdlib: bytes in, bytes out.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
import zlib
from pathlib import Path

MAGIC = b"ENCOREKV"
VERSION = 1
KEY_BYTES = 32
HEADER = struct.Struct("<8sI32s32sQII")


class CorruptFile(Exception):
    """The file for a key is short, damaged or from another model (it has been deleted)."""


def pack_header(fingerprint: bytes, key: bytes, payload: bytes | memoryview) -> bytes:
    return HEADER.pack(MAGIC, VERSION, fingerprint, key, len(payload), zlib.crc32(payload), 0)


class DiskStore:
    """Reads, writes, deletes and scans block files under ``root``; thread-safe per key."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: bytes, payload_bytes: int,
                 ) -> None:
        if len(fingerprint) != 32:
            raise ValueError("the disk tier fingerprint must be 32 bytes")
        self.dir = Path(root) / "kv"
        self.fingerprint = fingerprint
        self.payload_bytes = payload_bytes
        self.file_bytes = HEADER.size + payload_bytes
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.dir / h[:2] / f"{h}.kv"

    # ------------------------------------------------------------------ one file
    def write(self, key: bytes, payload: bytes | memoryview) -> None:
        """Write the block atomically (temp file + rename). Raises OSError (e.g. disk full)."""
        if len(payload) != self.payload_bytes:
            raise ValueError(f"payload of {len(payload)} bytes, expected {self.payload_bytes}")
        final = self.path(key)
        final.parent.mkdir(exist_ok=True)
        with self._lock:
            n = next(self._seq)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{n}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(pack_header(self.fingerprint, key, payload))
                f.write(payload)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def read(self, key: bytes) -> bytes:
        """The payload of ``key``. Raises CorruptFile (file deleted) if it is bad, and
        FileNotFoundError if it is gone."""
        path = self.path(key)
        with open(path, "rb") as f:
            data = f.read(self.file_bytes + 1)
        problem = self._check(data[: HEADER.size], key, len(data))
        if problem is None:
            payload = data[HEADER.size:]
            if zlib.crc32(payload) != HEADER.unpack(data[: HEADER.size])[5]:
                problem = "checksum mismatch"
            else:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recency survives restarts (the scan sorts by mtime)
                return payload
        self._remove(path)
        raise CorruptFile(f"{path.name}: {problem}")

    def delete(self, key: bytes) -> None:
        self._remove(self.path(key))

    def _check(self, header: bytes, key: bytes | None, size: int) -> str | None:
        """Why a file with this header and total size is unusable, or None."""
        if len(header) < HEADER.size:
            return "shorter than its header"
        magic, version, fp, fkey, length, _, _ = HEADER.unpack(header)
        if magic != MAGIC:
            return "not an Encore KV file"
        if version != VERSION:
            return f"format version {version}, expected {VERSION}"
        if fp != self.fingerprint:
            return "written for another model or KV layout"
        if key is not None and fkey != key:
            return "holds another key"
        if length != self.payload_bytes or size != self.file_bytes:
            return "truncated or wrong length"
        return None

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # ------------------------------------------------------------------ start-up
    def scan(self, capacity: int) -> tuple[list[bytes], int]:
        """Valid keys on disk, oldest first (at most ``capacity``; older extras deleted),
        and how many bad files were found and deleted. Leftover temp files are removed."""
        found: list[tuple[float, bytes]] = []
        bad = 0
        for path in self.dir.glob("*/*"):
            if path.name.endswith(".tmp"):
                self._remove(path)
                continue
            key = self._valid_key(path)
            if key is None:
                self._remove(path)
                bad += 1
                continue
            found.append((path.stat().st_mtime, key))
        found.sort()
        keys = [k for _, k in found]
        for key in keys[: max(0, len(keys) - capacity)]:
            self.delete(key)
        return keys[max(0, len(keys) - capacity):], bad

    def _valid_key(self, path: Path) -> bytes | None:
        """The key of a file whose name and header check out (payload checked on read)."""
        if not path.name.endswith(".kv"):
            return None
        try:
            key = bytes.fromhex(path.name[:-3])
            with open(path, "rb") as f:
                header = f.read(HEADER.size)
            size = path.stat().st_size
        except (ValueError, OSError):
            return None
        if len(key) != KEY_BYTES or self._check(header, key, size) is not None:
            return None
        return key
