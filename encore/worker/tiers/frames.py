"""One block as bytes, framed and authenticated: what the disk tier's files and the remote
tier's values hold.

    ┌──────────────── header (116 bytes, little-endian) ────────────────┐┌── payload ──┐
    │ magic "ENCOREKV" │ version u32 │ fingerprint 32B │ key 32B │       ││ one block's  │
    │ payload length u64 │ MAC 32B                                       ││ K/V, all     │
    └────────────────────────────────────────────────────────────────────┘│ layers, as   │
                                                                          │ the tier     │
                                                                          │ codec wrote  │

The fingerprint names the model and the KV layout (shape, dtype, block size, tier codec and
its parameters): a block of another model, or written with another codec, is never loaded.
The MAC is a keyed BLAKE2b of the header fields before it and the payload, keyed from the
deployment secret: a frame forged or damaged anywhere (a valid header over other bytes, say)
is refused, never served to a user. Pure stdlib.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

MAGIC = b"ENCOREKV"
VERSION = 2  # 1: crc32 instead of the MAC
KEY_BYTES = 32
MAC_BYTES = 32
FIELDS = struct.Struct("<8sI32s32sQ")  # what the MAC covers, with the payload
HEADER = struct.Struct("<8sI32s32sQ32s")


class CorruptFrame(Exception):
    """A frame that is short, damaged, forged or from another model."""


class Frames:
    """Packs and checks the frames of one model's blocks (``payload_bytes`` each)."""

    def __init__(self, fingerprint: bytes, payload_bytes: int, mac_key: bytes) -> None:
        if len(fingerprint) != 32:
            raise ValueError("the KV fingerprint must be 32 bytes")
        if not 16 <= len(mac_key) <= 64:
            raise ValueError("the KV MAC key must be 16 to 64 bytes")
        self.fingerprint = fingerprint
        self.payload_bytes = payload_bytes
        self.frame_bytes = HEADER.size + payload_bytes
        self.mac_key = mac_key

    def header(self, key: bytes, payload: bytes | memoryview) -> bytes:
        fields = FIELDS.pack(MAGIC, VERSION, self.fingerprint, key, len(payload))
        return fields + self._mac(fields, payload)

    def unpack(self, key: bytes, frame: bytes | memoryview) -> memoryview:
        """The payload of ``frame`` (which must hold ``key``); raises CorruptFrame."""
        frame = memoryview(frame)
        problem = self.check_header(frame[: HEADER.size], key, len(frame))
        if problem is None:
            mac = self._mac(frame[: FIELDS.size], frame[HEADER.size:])
            if hmac.compare_digest(mac, frame[FIELDS.size: HEADER.size]):
                return frame[HEADER.size:]
            problem = "authentication failed (damaged, forged, or another secret's)"
        raise CorruptFrame(problem)

    def check_header(self, header: bytes | memoryview, key: bytes | None,
                     size: int) -> str | None:
        """Why a frame with this header and total size is unusable, or None (the MAC is
        checked by ``unpack``)."""
        if len(header) < HEADER.size:
            return "shorter than its header"
        magic, version, fp, fkey, length, _ = HEADER.unpack(header)
        if magic != MAGIC:
            return "not an Encore KV block"
        if version != VERSION:
            return f"format version {version}, expected {VERSION}"
        if fp != self.fingerprint:
            return "written for another model or KV layout"
        if key is not None and fkey != key:
            return "holds another key"
        if length != self.payload_bytes or size != self.frame_bytes:
            return "truncated or wrong length"
        return None

    def _mac(self, fields: bytes | memoryview, payload: bytes | memoryview) -> bytes:
        h = hashlib.blake2b(key=self.mac_key, digest_size=MAC_BYTES)
        h.update(fields)
        h.update(payload)
        return h.digest()
