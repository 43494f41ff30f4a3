"""The disk KV tier's files: one file per block key, an authenticated header, atomic writes.

    <root>/kv/<key[:2] hex>/<key hex>.kv
    ┌──────────────── header (120 bytes, little-endian) ────────────────┐┌── payload ──┐
    │ magic "ENCOREKV" │ version u32 │ fingerprint 32B │ key 32B │       ││ one block's  │
    │ payload length u64 │ MAC 32B                                       ││ K/V, all     │
    └────────────────────────────────────────────────────────────────────┘│ layers       │

The fingerprint names the model and the KV layout (shape, dtype, block size): a file of
another model is never loaded. The MAC is a keyed BLAKE2b of the header fields before it and
the payload, keyed from the deployment secret: a file forged or damaged anywhere (a valid
header with the wrong bytes, say) is a miss, never KV served to a user. Files are written
under a temp name and renamed, so a reader sees a whole file or none. A short, corrupt or
foreign file is a miss: it is deleted and counted. The index of valid files is rebuilt from
the directory at start-up (oldest first), so the cache survives restarts; what the scan cannot
read (a stray directory, a file without permission) is skipped and left alone, and a
directory that cannot be written (a read-only mount) still serves loads. Pure stdlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import stat
import struct
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

MAGIC = b"ENCOREKV"
VERSION = 2  # 1: crc32 instead of the MAC
KEY_BYTES = 32
MAC_BYTES = 32
FIELDS = struct.Struct("<8sI32s32sQ")  # what the MAC covers, with the payload
HEADER = struct.Struct("<8sI32s32sQ32s")


class CorruptFile(Exception):
    """The file for a key is short, damaged, forged or from another model (deleted)."""


def _mac(mac_key: bytes, fields: bytes, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(key=mac_key, digest_size=MAC_BYTES)
    h.update(fields)
    h.update(payload)
    return h.digest()


class DiskStore:
    """Reads, writes, deletes and scans block files under ``root``; thread-safe per key.
    ``mac_key``: the secret (from the deployment secret) that authenticates every file."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: bytes, payload_bytes: int,
                 mac_key: bytes) -> None:
        if len(fingerprint) != 32:
            raise ValueError("the disk tier fingerprint must be 32 bytes")
        if not 16 <= len(mac_key) <= 64:
            raise ValueError("the disk tier MAC key must be 16 to 64 bytes")
        self.dir = Path(root) / "kv"
        self.fingerprint = fingerprint
        self.payload_bytes = payload_bytes
        self.file_bytes = HEADER.size + payload_bytes
        self.mac_key = mac_key
        self._seq = itertools.count()
        self._lock = threading.Lock()
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
        self.writable = self._probe_writable()

    def _probe_writable(self) -> bool:
        """Whether files can be created here (a read-only mount serves loads only)."""
        probe = self.dir / f".probe.{os.getpid()}.tmp"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            logger.warning("disk KV tier %s is read-only (%s): it serves loads, stores nothing",
                           self.dir, e.strerror or e)
            return False
        return True

    def pack_header(self, key: bytes, payload: bytes | memoryview) -> bytes:
        fields = FIELDS.pack(MAGIC, VERSION, self.fingerprint, key, len(payload))
        return fields + _mac(self.mac_key, fields, payload)

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
                f.write(self.pack_header(key, payload))
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
            mac = _mac(self.mac_key, data[: FIELDS.size], payload)
            if not hmac.compare_digest(mac, data[FIELDS.size: HEADER.size]):
                problem = "authentication failed (damaged, forged, or another secret's)"
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
        magic, version, fp, fkey, length, _ = HEADER.unpack(header)
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
        """Delete a file; one that cannot be deleted (read-only mount) is left in place."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.debug("cannot delete %s: %s", path, e)

    # ------------------------------------------------------------------ start-up
    def scan(self, capacity: int) -> tuple[list[bytes], int]:
        """Valid keys on disk, oldest first (at most ``capacity``; older extras deleted),
        and how many bad files were found and deleted. Leftover temp files are removed;
        anything that is not a regular file, or cannot be read, is skipped."""
        found: list[tuple[float, bytes]] = []
        bad = 0
        for path in self.dir.glob("*/*"):
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # a stray directory or link: not ours to judge
            if path.name.endswith(".tmp"):
                self._remove(path)
                continue
            verdict = self._valid_key(path, st.st_size)
            if verdict is None:
                continue  # unreadable: skipped, left alone
            if verdict is False:
                self._remove(path)
                bad += 1
                continue
            found.append((st.st_mtime, verdict))
        found.sort()
        keys = [k for _, k in found]
        for key in keys[: max(0, len(keys) - capacity)]:
            self.delete(key)
        return keys[max(0, len(keys) - capacity):], bad

    def _valid_key(self, path: Path, size: int) -> bytes | bool | None:
        """The key of a file whose name and header check out (payload checked on read);
        False for a bad file, None for one that cannot be read."""
        try:
            key = bytes.fromhex(path.name[:-3]) if path.name.endswith(".kv") else b""
        except ValueError:
            key = b""
        try:
            with open(path, "rb") as f:
                header = f.read(HEADER.size)
        except OSError as e:
            logger.warning("disk KV tier: skipped %s (%s)", path, e.strerror or e)
            return None
        if len(key) != KEY_BYTES or self._check(header, key, size) is not None:
            return False
        return key
