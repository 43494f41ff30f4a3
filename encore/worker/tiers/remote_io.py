"""Device <-> remote store transfers of whole blocks, on I/O threads: the fleet's shared tier.

The store speaks the Redis protocol (Valkey or Redis). A block is one value, the same framed
(and, with a ``tier_kv_codec``, encoded) bytes as a disk file (``frames``: fingerprint, key,
keyed MAC), under

    <namespace>:<block key hex>      namespace = "encore:kv:" + model fingerprint + secret id

so replicas of one model, KV layout and codec and one deployment secret share entries;
replicas with another secret or codec never read (nor overwrite) them: to them every key is
a plain miss. Values are written with the tier's TTL.

Failure is a miss, never an error: an op against a store that is unreachable, too slow,
full (OOM) or flushed fails with an ``error_kind`` (``REMOTE_ERRORS``) and the engine
recomputes. After a connection failure the store is "down" and ops fail at once until a
backoff (1 s, doubling to 30 s) has passed; the next op tries again, and a success brings it
back "up". A value that fails its check is deleted and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import torch

from encore.protocol.messages import KVDone, KVProbe, KVProbed, KVTransfer
from encore.worker.tiers.blocks import DeviceBlocks
from encore.worker.tiers.frames import CorruptFrame, Frames
from encore.worker.tiers.io_time import IOClock

logger = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
PROBE_BATCH = 256  # keys per EXISTS round trip


class RemoteError(Exception):
    """A remote op failed; ``kind`` is one of ``REMOTE_ERRORS``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RemoteStore:
    """One connection pool to the store, key naming, and the up/down state (thread-safe)."""

    def __init__(self, url: str, namespace: str, frames: Frames, ttl_s: float,
                 max_value_bytes: int, timeout_s: float, password: str | None = None) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s,
                                           password=password or None,
                                           health_check_interval=30)
        self.namespace = namespace
        self.frames = frames
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_value_bytes = max_value_bytes
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._failures = 0
        self.up = True

    def name(self, key: bytes) -> str:
        return f"{self.namespace}:{key.hex()}"

    # ------------------------------------------------------------------ ops
    def get(self, key: bytes) -> bytes:
        """The block's payload; RemoteError("miss") if the store lacks it."""
        data = self._call(self.client.get, self.name(key))
        if data is None:
            raise RemoteError("miss", "not in the remote store (expired, evicted or flushed)")
        try:
            return bytes(self.frames.unpack(key, data))
        except CorruptFrame as e:
            self._call(self.client.delete, self.name(key))
            raise RemoteError("corrupt", f"remote value {key.hex()[:16]}: {e}") from None

    def put(self, key: bytes, payload: bytes | memoryview) -> None:
        size = self.frames.frame_bytes
        if size > self.max_value_bytes:
            raise RemoteError("too_big", f"a block is {size} bytes, over the tier's limit")
        value = self.frames.header(key, payload) + bytes(payload)
        self._call(self.client.set, self.name(key), value, px=self.ttl_ms)

    def exists(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` the store holds (one round trip per ``PROBE_BATCH``)."""
        found = 0
        for i in range(0, len(keys), PROBE_BATCH):
            batch = keys[i:i + PROBE_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.exists(self.name(key))
            for hit in self._call(pipe.execute):
                if not hit:
                    return found
                found += 1
        return found

    # ------------------------------------------------------------------ state
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one command; classify failures; keep the up/down state and the backoff."""
        with self._lock:
            if self._waiting(time.monotonic()):
                raise RemoteError("down", "the remote store is down (retrying later)")
        try:
            result = fn(*args, **kwargs)
        except redis.exceptions.TimeoutError as e:
            raise RemoteError("timeout", f"the remote store timed out: {e}") from None
        except redis.exceptions.ConnectionError as e:
            self._went_down(e)
            raise RemoteError("down", f"the remote store is unreachable: {e}") from None
        except redis.exceptions.ResponseError as e:
            kind = "full" if str(e).startswith("OOM") else "other"
            raise RemoteError(kind, f"the remote store refused: {e}") from None
        except redis.exceptions.RedisError as e:
            raise RemoteError("other", f"remote store error: {e}") from None
        self._came_up()
        return result

    def _went_down(self, error: Exception) -> None:
        """One failed attempt: the backoff doubles once per attempt, not once per op that was
        in flight when the store went away (several I/O threads failing together would
        otherwise jump straight to the longest wait)."""
        with self._lock:
            now = time.monotonic()
            if self._waiting(now):
                return  # another op of the same attempt failed first
            backoff = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
            self._failures += 1
            self._retry_at = now + backoff
            if self.up:
                logger.warning("remote KV tier down (%s); retrying in %.0f s", error, backoff)
            self.up = False

    def _waiting(self, now: float) -> bool:
        """Down, and the backoff has not passed yet (the caller holds the lock)."""
        return not self.up and now < self._retry_at

    def _came_up(self) -> None:
        if self.up:
            return
        with self._lock:
            if not self.up:
                logger.info("remote KV tier is back")
            self.up, self._failures = True, 0


@dataclass
class _Pending:
    """A remote op not finished yet: its future, then (a read) a copy to the device."""

    op: KVTransfer | KVProbe
    future: Future
    event: Any = None  # torch.cuda.Event of a read's copy to the device
    seconds: float = 0.0


class RemoteIO:
    """The remote tier's transfers and probes; ``store`` is None when it is not configured."""

    def __init__(self, blocks: DeviceBlocks, store: RemoteStore | None) -> None:
        self.blocks = blocks
        self.store = store
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-remote")
        self.clock = IOClock()
        self.pending: list[_Pending] = []

    @property
    def up(self) -> bool | None:
        return None if self.store is None else self.store.up

    def write(self, op: KVTransfer, data: torch.Tensor, event: Any, done: list[KVDone]) -> None:
        """Store one device block from ``DeviceBlocks.stage_out`` (ready once ``event``
        fires)."""
        if self.store is None:
            done.append(KVDone(op.op_id, False, "no remote tier", error_kind="other"))
            return
        self.pending.append(_Pending(op, self.io.submit(self._write, op, data, event)))

    def _write(self, op: KVTransfer, data: torch.Tensor, event: Any) -> float:
        if event is not None:
            event.synchronize()
        assert self.store is not None
        start = self.clock.start()
        self.store.put(op.key, self.blocks.payload(data))
        return self.clock.charge(start)

    def read(self, op: KVTransfer, done: list[KVDone]) -> None:
        if self.store is None:
            done.append(KVDone(op.op_id, False, "no remote tier", error_kind="other"))
        else:
            self.pending.append(_Pending(op, self.io.submit(self._read, op.key)))

    def _read(self, key: bytes) -> tuple[torch.Tensor, float]:
        assert self.store is not None
        start = self.clock.start()
        data = self.blocks.from_payload(self.store.get(key))
        return data, self.clock.charge(start)

    def probe(self, probe: KVProbe) -> None:
        if self.store is not None:
            self.pending.append(_Pending(probe, self.io.submit(self.store.exists, probe.keys)))

    def running(self) -> list[Future]:
        """The I/O not finished yet."""
        return [p.future for p in self.pending if not p.future.done()]

    def poll(self) -> tuple[list[KVDone], list[KVProbed]]:
        """Finished transfers and probes; a finished read is copied into its block first."""
        done: list[KVDone] = []
        probed: list[KVProbed] = []
        still: list[_Pending] = []
        for p in self.pending:
            if not p.future.done():
                still.append(p)
            elif isinstance(p.op, KVProbe):
                probed.append(self._probed(p))
            elif p.event is not None:  # a read's copy to the device
                if p.event.query():
                    done.append(KVDone(p.op.op_id, True, seconds=p.seconds))
                else:
                    still.append(p)
            else:
                result = self._finish(p, done)
                if result is not None:
                    still.append(result)
        self.pending = still
        return done, probed

    def _probed(self, p: _Pending) -> KVProbed:
        try:
            return KVProbed(p.op.op_id, p.future.result())
        except RemoteError as e:
            return KVProbed(p.op.op_id, 0, e.kind)

    def _finish(self, p: _Pending, done: list[KVDone]) -> _Pending | None:
        """Report a finished write or read; a read goes on to its copy (returned pending)."""
        op = p.op
        assert isinstance(op, KVTransfer)
        try:
            result = p.future.result()
        except RemoteError as e:
            done.append(KVDone(op.op_id, False, str(e), error_kind=e.kind))
            return None
        if op.dst == "remote":
            done.append(KVDone(op.op_id, True, seconds=result))
            return None
        staged, p.seconds = result
        p.event = self.blocks.copy_in(staged, op.dst_slot)
        if p.event is None:  # the CPU: done already
            done.append(KVDone(op.op_id, True, seconds=p.seconds))
            return None
        return p

    def close(self) -> None:
        self.io.shutdown(wait=True)
        if self.store is not None:
            self.store.client.close()

