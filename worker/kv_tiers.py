"""The worker's half of the KV tiers: the host pool tensor, the disk files, the transfers.

``TieredRunner`` wraps the ``ModelRunner``: before each forward pass it runs the step's tier
ops (``SchedulerOutput.kv_deletes``, ``kv_stores``, ``kv_loads``) and it reports finished
transfers as ``ModelRunnerOutput.kv_done``. Order within a step (each op may read a slot that
a later op of the same step overwrites):

    1. delete disk files of keys the disk index evicted
    2. stores from the host tier (host → disk: snapshot the slot, write in the I/O pool)
    3. stores from the device (device → host: copy; device → disk: snapshot, write)
    4. loads (host → device: copy; disk → device: read in the I/O pool, copy once read)
    5. the forward pass (on CUDA it waits for the side stream's copies through an event)

On the CPU the "copies" are memcpys between the device pool and the host pool and complete
at once; on CUDA they run on a side stream and complete when their event fires. Disk I/O
always runs in a thread pool and completes in a later step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from configs import EncoreConfig
from kvmanager.transfer.disk import CorruptFile, DiskStore
from scheduler.protocol import KVDone, KVTransfer, ModelRunnerOutput, SchedulerOutput, WorkerReady

logger = logging.getLogger(__name__)

GIB = 1024**3
IDLE_WAIT_S = 0.005  # an idle step waits this long for disk I/O before answering


@dataclass
class _Pending:
    """A transfer not finished yet: an I/O future and/or a CUDA event."""

    op: KVTransfer
    future: Future | None = None
    event: Any = None  # torch.cuda.Event
    staged: torch.Tensor | None = None  # a disk read waiting to be copied to the device
    seconds: float = 0.0  # how long the disk read took
    started: Any = None  # a timing event recorded before a batch of copies (CUDA)
    share: int = 1  # ops in that batch: each is charged the batch time / share


class KVTierWorker:
    """Runs tier transfers against ``kv_caches`` (per layer ``[2, blocks, bs, heads, dim]``)."""

    def __init__(self, config: EncoreConfig, kv_caches: list[torch.Tensor],
                 fingerprint: bytes) -> None:
        self.kv = kv_caches
        first = kv_caches[0]
        self.device = first.device
        self.block_shape = (len(kv_caches), 2, *first.shape[2:])
        self.dtype = first.dtype
        self.block_bytes = first[:, 0].numel() * first.element_size() * len(kv_caches)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host = self._host_pool(config.cache.host_cache_gib, cuda)
        self.disk: DiskStore | None = None
        self.num_disk_blocks, self.disk_keys, self.corrupt = 0, [], 0
        if config.cache.disk_cache_dir:
            self._open_disk(config, fingerprint)
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-io")
        self.pending: list[_Pending] = []

    def _host_pool(self, gib: float, pin: bool) -> torch.Tensor | None:
        num = int(gib * GIB // self.block_bytes)
        if num <= 0:
            return None
        logger.info("host KV tier: %d blocks (%.2f GiB)%s", num, num * self.block_bytes / GIB,
                    ", pinned" if pin else "")
        return torch.zeros((num, *self.block_shape), dtype=self.dtype, pin_memory=pin)

    def _open_disk(self, config: EncoreConfig, fingerprint: bytes) -> None:
        capacity = int(config.cache.disk_cache_gib * GIB // self.block_bytes)
        if capacity <= 0:
            return
        try:
            store = DiskStore(config.cache.disk_cache_dir or "", fingerprint, self.block_bytes)
            self.disk_keys, self.corrupt = store.scan(capacity)
        except OSError as e:
            logger.warning("the disk KV tier is off: %s", e)
            return
        self.disk, self.num_disk_blocks = store, capacity
        logger.info("disk KV tier: %d of %d blocks found in %s (%d bad files removed)",
                    len(self.disk_keys), capacity, store.dir, self.corrupt)

    @property
    def num_host_blocks(self) -> int:
        return 0 if self.host is None else self.host.shape[0]

    # ------------------------------------------------------------------ block access
    def _gather_blocks(self, blocks: list[int]) -> torch.Tensor:
        """Device blocks as ``[n, layers, 2, bs, heads, dim]`` (new, contiguous, same device):
        one index op per layer, however many blocks."""
        ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return torch.stack([layer.index_select(1, ids).transpose(0, 1) for layer in self.kv],
                           dim=1)

    def _scatter_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        """``data`` [n, layers, 2, ...] (on the device) into device ``blocks``: one index op
        per layer."""
        ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for i, layer in enumerate(self.kv):
            layer.index_copy_(1, ids, data[:, i].transpose(0, 1))

    def _scatter(self, block: int, data: torch.Tensor) -> None:
        self._scatter_blocks([block], data.to(self.device, non_blocking=True)[None])

    @staticmethod
    def _to_bytes(t: torch.Tensor) -> memoryview:
        return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")

    def _from_bytes(self, data: bytes) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw.view(self.dtype).view(self.block_shape)

    # ------------------------------------------------------------------ one step
    def before_step(self, step: SchedulerOutput) -> list[KVDone]:
        """Issue the step's ops (in the documented order); return those already finished."""
        done: list[KVDone] = []
        for key in step.kv_deletes:
            if self.disk is not None:
                self.disk.delete(key)
        if step.kv_stores or step.kv_loads:
            self._copies(step, done)
        done.extend(self.poll())
        return done

    def _copies(self, step: SchedulerOutput, done: list[KVDone]) -> None:
        """Stores (host-source first), then loads; on CUDA on the side stream, which waits
        for the forward passes before it and which the next forward pass waits for."""
        if self.stream is None:
            self._run_copies(step, done)
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self._run_copies(step, done)
        main.wait_event(self._record())

    def _run_copies(self, step: SchedulerOutput, done: list[KVDone]) -> None:
        """Host-source stores, device-source stores (gathered in one pass per layer), then
        loads (host loads staged and scattered in one pass per layer)."""
        for op in step.kv_stores:
            if op.src == "host":
                self._store(op, self.host[op.src_slot], done)
        from_device = [op for op in step.kv_stores if op.src != "host"]
        if from_device:
            started, start = self._record(timing=True), time.perf_counter()
            blocks = self._gather_blocks([op.src_slot for op in from_device])
            for op, data in zip(from_device, blocks, strict=True):
                self._store(op, data, done, (started, start, len(from_device)))
        host_loads = [op for op in step.kv_loads if op.src == "host"]
        for op in step.kv_loads:
            if op.src != "host":
                self._load_from_disk(op, done)
        if host_loads:
            started, start = self._record(timing=True), time.perf_counter()
            staged = torch.empty((len(host_loads), *self.block_shape), dtype=self.dtype,
                                 device=self.device)
            for i, op in enumerate(host_loads):
                staged[i].copy_(self.host[op.src_slot], non_blocking=True)
            self._scatter_blocks([op.dst_slot for op in host_loads], staged)
            for op in host_loads:
                self._finish_copy(op, done, (started, start, len(host_loads)))

    def after_step(self, idle: bool) -> list[KVDone]:
        """Transfers that finished meanwhile; an idle step waits briefly for disk I/O."""
        futures = [p.future for p in self.pending if p.future is not None and not p.future.done()]
        if idle and futures:
            wait(futures, timeout=IDLE_WAIT_S, return_when="FIRST_COMPLETED")
        return self.poll()

    def _store(self, op: KVTransfer, data: torch.Tensor, done: list[KVDone],
               batch: tuple[Any, float, int] | None = None) -> None:
        """Store one block's ``data`` (a host slot, or a gathered device block)."""
        if op.dst == "host":
            self.host[op.dst_slot].copy_(data, non_blocking=True)
            self._finish_copy(op, done, batch or (None, time.perf_counter(), 1))
        elif self.disk is None:
            done.append(KVDone(op.op_id, False, "the disk tier is off"))
        else:
            snapshot = data.to("cpu", copy=True, non_blocking=self.stream is not None)
            event = self._record()
            self.pending.append(_Pending(op, self.io.submit(self._write, op.key, snapshot,
                                                            event)))

    def _write(self, key: bytes, snapshot: torch.Tensor, event: Any) -> float:
        if event is not None:
            event.synchronize()
        assert self.disk is not None
        start = time.perf_counter()
        self.disk.write(key, self._to_bytes(snapshot))
        return time.perf_counter() - start

    def _load_from_disk(self, op: KVTransfer, done: list[KVDone]) -> None:
        if self.disk is None:
            done.append(KVDone(op.op_id, False, "the disk tier is off"))
        else:
            self.pending.append(_Pending(op, self.io.submit(self._read, op.key)))

    def _read(self, key: bytes) -> tuple[torch.Tensor, float]:
        assert self.disk is not None
        start = time.perf_counter()
        data = self._from_bytes(self.disk.read(key))
        return data, time.perf_counter() - start

    def _record(self, timing: bool = False) -> Any:
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(self.stream)
        return event

    def _finish_copy(self, op: KVTransfer, done: list[KVDone],
                     batch: tuple[Any, float, int]) -> None:
        """A copy was issued as one of a batch (started event, start time, batch size): done
        now on the CPU, when its event fires on CUDA; each op is charged its share of the
        batch's time (CUDA: timed by events, so waiting for the forward pass is excluded)."""
        started, start, share = batch
        if self.stream is None:
            done.append(KVDone(op.op_id, True, seconds=(time.perf_counter() - start) / share))
        else:
            timed = started is not None
            self.pending.append(_Pending(op, event=self._record(timing=timed), started=started,
                                         share=share))

    # ------------------------------------------------------------------ completions
    def poll(self) -> list[KVDone]:
        """Finished transfers; a finished disk read is copied into its device block first."""
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
                ctx = torch.cuda.stream(self.stream) if self.stream is not None else _nullcontext()
                with ctx:
                    self._scatter(p.op.dst_slot, p.staged.to(self.device, non_blocking=True))
                p.staged, p.event = None, self._record()
            if p.event is not None and not p.event.query():
                still.append(p)
                continue
            if p.started is not None and p.event is not None:  # a timed batch of copies
                p.seconds = p.started.elapsed_time(p.event) / 1e3 / p.share
            done.append(KVDone(p.op.op_id, True, seconds=p.seconds))
        self.pending = still
        return done

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


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def kv_fingerprint(config: EncoreConfig, arch: Any, dtype: torch.dtype,
                   block_shape: tuple[int, ...]) -> bytes:
    """32 bytes naming the model and the KV layout: files of another model never load."""
    desc = {"model": config.model.model or "embedded-smollm2", "load_format":
            config.model.load_format, "arch": repr(arch), "dtype": str(dtype),
            "block_shape": list(block_shape), "format": 1}
    return hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=32).digest()


class TieredRunner:
    """A ``ModelRunner`` plus the tier data plane; the worker's executors drive this."""

    def __init__(self, config: EncoreConfig) -> None:
        from worker.model_runner import ModelRunner

        self.runner = ModelRunner(config)
        kv = self.runner.kv_caches
        shape = (len(kv), 2, *kv[0].shape[2:])
        fp = kv_fingerprint(config, self.runner.arch, kv[0].dtype, shape)
        self.tiers = KVTierWorker(config, kv, fp)

    def ready_message(self) -> WorkerReady:
        t = self.tiers
        return msgspec.structs.replace(
            self.runner.ready_message(), kv_block_bytes=t.block_bytes,
            num_host_blocks=t.num_host_blocks, num_disk_blocks=t.num_disk_blocks,
            disk_keys=t.disk_keys, kv_disk_corrupt_files=t.take_corrupt())

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        done = self.tiers.before_step(step)
        out = self.runner.execute(step)
        done.extend(self.tiers.after_step(idle=not step.seqs))
        out.kv_done = done
        out.kv_disk_corrupt_files = self.tiers.take_corrupt()
        return out

    def close(self) -> None:
        self.tiers.close()

    def __getattr__(self, name: str) -> Any:
        """Everything else is the model runner's (``kv_caches``, ``graphs``, ``arch``...)."""
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)
