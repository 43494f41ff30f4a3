"""The disk KV tier's files: one file per block key, framed (``frames``), atomic writes.

    <root>/kv/<key[:2] hex>/<key hex>.kv      a header with a keyed MAC, then the block

Files are written under a temp name and renamed, so a reader sees a whole file or none. A
short, corrupt, forged or foreign file is a miss: it is deleted and counted. A file of this
model in another of its layouts (``retired``: another KV dtype or ``tier_kv_codec``) is a
plain miss: deleted at start-up, not counted as bad. The index of
valid files is rebuilt from the directory at start-up (oldest first), so the cache survives
restarts; what the scan cannot read (a stray directory, a file without permission) is skipped
and left alone, and a directory that cannot be written (a read-only mount) still serves
loads. Pure stdlib.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import threading
from pathlib import Path

from encore.worker.tiers.frames import HEADER, KEY_BYTES, MAGIC, VERSION, CorruptFrame, Frames

logger = logging.getLogger(__name__)


class CorruptFile(CorruptFrame):
    """The file for a key is short, damaged, forged or from another model (deleted)."""


class DiskStore:
    """Reads, writes, deletes and scans block files under ``root``; thread-safe per key.
    ``mac_key``: the secret (from the deployment secret) that authenticates every file;
    ``retired``: fingerprints whose files the scan removes without counting them bad."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: bytes, payload_bytes: int,
                 mac_key: bytes, retired: frozenset[bytes] = frozenset()) -> None:
        self.frames = Frames(fingerprint, payload_bytes, mac_key)
        self.retired = retired
        self.dir = Path(root) / "kv"
        self.payload_bytes = payload_bytes
        self.file_bytes = self.frames.frame_bytes
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
                f.write(self.frames.header(key, payload))
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
        try:
            payload = bytes(self.frames.unpack(key, data))
        except CorruptFrame as e:
            self._remove(path)
            raise CorruptFile(f"{path.name}: {e}") from None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency survives restarts (the scan sorts by mtime)
        return payload

    def delete(self, key: bytes) -> None:
        self._remove(self.path(key))

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
        and how many bad files were found and deleted. Leftover temp files and files of a
        retired layout are removed; anything that is not a regular file, or cannot be read,
        is skipped."""
        found: list[tuple[float, bytes]] = []
        dropped = {"bad": 0, "retired": 0}
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
            if isinstance(verdict, str):
                self._remove(path)
                dropped[verdict] += 1
                continue
            found.append((st.st_mtime, verdict))
        if dropped["retired"]:
            logger.info("disk KV tier: removed %d files of another KV dtype or tier codec",
                        dropped["retired"])
        found.sort()
        keys = [k for _, k in found]
        for key in keys[: max(0, len(keys) - capacity)]:
            self.delete(key)
        return keys[max(0, len(keys) - capacity):], dropped["bad"]

    def _valid_key(self, path: Path, size: int) -> bytes | str | None:
        """The key of a file whose name and header check out (payload checked on read);
        "retired" for a file of a retired layout, "bad" for a bad file, None for one that
        cannot be read."""
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
        if len(key) != KEY_BYTES:
            return "bad"
        if self.frames.check_header(header, key, size) is not None:
            return "retired" if self._layout(header) in self.retired else "bad"
        return key

    @staticmethod
    def _layout(header: bytes) -> bytes | None:
        """The fingerprint a well-formed header names (None: not one of ours)."""
        if len(header) < HEADER.size:
            return None
        magic, version, fingerprint, *_ = HEADER.unpack(header)
        return fingerprint if (magic, version) == (MAGIC, VERSION) else None
