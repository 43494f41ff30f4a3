"""Device/host <-> disk transfers of whole blocks, on I/O threads.

Writes and reads have their own thread pools (a load never queues behind a backlog of
writes) and complete in a later step. A store from the device is gathered and copied to the
CPU behind an event (``DeviceBlocks.stage_out``); a store from host is read by the I/O thread
straight from the pinned host slot, whose bytes are the payload already (the slot is pinned
in P1's host index until the op completes). A finished read is copied into its device block
on the side stream, then reported. Blocks are encoded (``DeviceBlocks.codec``) on the GPU,
or on the CPU by the I/O thread, whose measured time includes it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from encore.protocol.messages import KVDone, KVTransfer
from encore.worker.tiers.blocks import DeviceBlocks
from encore.worker.tiers.disk_files import CorruptFile, DiskStore
from encore.worker.tiers.host_pool import HostPool
from encore.worker.tiers.io_time import IOClock

logger = logging.getLogger(__name__)

GIB = 1024**3
@dataclass
class _Pending:
    """A disk transfer not finished yet: an I/O future, then (a read) a copy to the device."""

    op: KVTransfer
    future: Future | None = None
    event: Any = None  # torch.cuda.Event of the read's copy to the device
    staged: torch.Tensor | None = None  # a disk read waiting to be copied to the device
    seconds: float = 0.0  # the disk read's time (``IOClock``)


class DiskIO:
    """The disk tier's transfers; ``store`` is None when the tier is off (every op fails)."""

    def __init__(self, blocks: DeviceBlocks, host: HostPool | None, root: str | None,
                 gib: float, fingerprint: bytes, mac_key: bytes,
                 retired: frozenset[bytes] = frozenset()) -> None:
        self.blocks = blocks
        self.host = host
        self.store: DiskStore | None = None
        self.num_blocks, self.corrupt = 0, 0
        self.keys: list[bytes] = []
        if root:
            self._open(root, gib, fingerprint, mac_key, retired)
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-write")
        self.io_read = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-read")
        self.clock = IOClock()  # reads and writes share the disk
        self.pending: list[_Pending] = []

    @property
    def writable(self) -> bool:
        return self.store is not None and self.store.writable

    def _open(self, root: str, gib: float, fingerprint: bytes, mac_key: bytes,
              retired: frozenset[bytes]) -> None:
        """``retired``: fingerprints of this model's other layouts (another KV dtype or tier
        codec): their files are removed at start-up as misses, not counted as bad."""
        capacity = int(gib * GIB // self.blocks.tier_block_bytes)
        if capacity <= 0:
            return
        try:
            store = DiskStore(root, fingerprint, self.blocks.tier_block_bytes, mac_key, retired)
            self.keys, self.corrupt = store.scan(capacity)
        except OSError as e:
            logger.warning("the disk KV tier is off: %s", e)
            return
        self.store, self.num_blocks = store, capacity
        logger.info("disk KV tier: %d of %d blocks found in %s (%d bad files removed)",
                    len(self.keys), capacity, store.dir, self.corrupt)

    def delete(self, key: bytes) -> None:
        if self.store is not None:
            self.store.delete(key)

    def write(self, op: KVTransfer, data: torch.Tensor | None, event: Any,
              done: list[KVDone]) -> None:
        """Write one block in the I/O pool: ``data`` (a device block from
        ``DeviceBlocks.stage_out``, ready once ``event`` fires) or, for None, the host slot
        ``op.src_slot``."""
        if self.store is None:
            done.append(KVDone(op.op_id, False, "the disk tier is off"))
            return
        self.pending.append(_Pending(op, self.io.submit(self._write, op, data, event)))

    def _write(self, op: KVTransfer, data: torch.Tensor | None, event: Any) -> float:
        if event is not None:
            event.synchronize()
        assert self.store is not None
        start = self.clock.start()
        if data is None:
            assert self.host is not None
            payload = self.blocks.as_bytes(self.host.block(op.src_slot))
        else:
            payload = self.blocks.payload(data)
        self.store.write(op.key, payload)
        return self.clock.charge(start)

    def read(self, op: KVTransfer, done: list[KVDone]) -> None:
        """Read one block in the read pool; copied into ``op.dst_slot`` once read."""
        if self.store is None:
            done.append(KVDone(op.op_id, False, "the disk tier is off"))
        else:
            self.pending.append(_Pending(op, self.io_read.submit(self._read, op.key)))

    def _read(self, key: bytes) -> tuple[torch.Tensor, float]:
        assert self.store is not None
        start = self.clock.start()
        data = self.blocks.from_payload(self.store.read(key))
        return data, self.clock.charge(start)

    def running(self) -> list[Future]:
        """The I/O not finished yet."""
        return [p.future for p in self.pending if p.future is not None and not p.future.done()]

    def poll(self) -> list[KVDone]:
        """Finished transfers; a finished read is copied into its device block first."""
        done: list[KVDone] = []
        still: list[_Pending] = []
        for p in self.pending:
            if p.future is not None:
                if not p.future.done():
                    still.append(p)
                    continue
                result = self._future_result(p)
                if result is not None:
                    done.append(result)
                    continue
            if p.staged is not None:  # a disk read to copy into its device block now
                self._copy_in(p)
            if p.event is not None and not p.event.query():
                still.append(p)
                continue
            done.append(KVDone(p.op.op_id, True, seconds=p.seconds))
        self.pending = still
        return done

    def _copy_in(self, p: _Pending) -> None:
        assert p.staged is not None
        p.event = self.blocks.copy_in(p.staged, p.op.dst_slot)
        p.staged = None

    def _future_result(self, p: _Pending) -> KVDone | None:
        """A KVDone if the I/O finished the op (or failed it); None if a copy remains."""
        assert p.future is not None
        try:
            result = p.future.result()
        except CorruptFile as e:
            self.corrupt += 1
            logger.warning("disk KV tier: dropped a bad file (%s)", e)
            return KVDone(p.op.op_id, False, str(e))
        except OSError as e:
            return KVDone(p.op.op_id, False, f"{type(e).__name__}: {e}")
        p.future = None
        if p.op.dst == "disk":
            return KVDone(p.op.op_id, True, seconds=result)
        p.staged, p.seconds = result
        return None

    def take_corrupt(self) -> int:
        n, self.corrupt = self.corrupt, 0
        return n

    def close(self) -> None:
        """Finish the disk I/O already submitted, then stop the I/O threads."""
        self.io.shutdown(wait=True)
        self.io_read.shutdown(wait=True)
