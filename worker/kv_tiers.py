"""The worker's half of the KV tiers: the host pool tensor, the disk files, the transfers.

``TieredRunner`` wraps the ``ModelRunner``: before each forward pass it runs the step's tier
ops (``SchedulerOutput.kv_deletes``, ``kv_stores``, ``kv_loads``) and it reports finished
transfers as ``ModelRunnerOutput.kv_done``. Order within a step (each op may read a slot that
a later op of the same step overwrites):

    1. delete disk files of keys the disk index evicted
    2. host -> disk flushes: the I/O pool reads the (pinned, in the index) host slot itself
    3. device -> disk stores: gathered, copied to the CPU, written by the I/O pool
    4. disk -> device loads: read in the I/O pool, copied to the device once read (later)
    5. per layer group: gather the group's layers of the blocks to store in host, then copy
       the group's host -> device loads (``LayerCopies``)
    6. the stores' copies into the host pool
    7. the forward pass: on CUDA each layer group waits for its group's event; group g+1 is
       issued when the forward pass reaches group g (the CPU work of issuing copies runs
       while the GPU computes), so the first layers compute while later groups are still
       crossing PCIe. Group 0 is one layer: nothing computes before it is in.

The host pool is one pinned tensor per layer group (``HostPool``); runs of consecutive
slots move as one copy. On the CPU the "copies" are memcpys and complete at once; on CUDA
they run on a side stream and complete when their events fire. Disk I/O runs in thread pools
(reads apart from writes) and completes in a later step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
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
LOAD_GROUPS = 8  # layer groups of a host load (CUDA): layer group g computes once g is in
IDLE_WAIT_S = 0.005  # an idle step waits this long for disk I/O before answering


@dataclass
class _Pending:
    """A disk transfer not finished yet: an I/O future, then (a read) a copy to the device."""

    op: KVTransfer
    future: Future | None = None
    event: Any = None  # torch.cuda.Event of the read's copy to the device
    staged: torch.Tensor | None = None  # a disk read waiting to be copied to the device
    seconds: float = 0.0  # how long the disk read took


@dataclass
class _CopyBatch:
    """Host copies issued together on the side stream (CUDA): all done when ``event`` fires
    (one event per batch, not per block: hundreds of blocks move in a step); each op is
    charged the batch's copy time (its spans) over the number of ops."""

    ops: list[KVTransfer]
    spans: list[tuple[Any, Any]]  # timing events around each part of the batch's copies

    @property
    def event(self) -> Any:
        return self.spans[-1][1]


class HostPool:
    """The host tier's blocks, one pinned tensor per layer group: group ``g`` holds layers
    ``bounds[g]`` of every slot, ``[slots, layers_in_group, 2, bs, heads, dim]``, so a run of
    consecutive slots is one contiguous copy per group and a load can hand the forward pass
    its first layers while later groups are still on the way."""

    def __init__(self, num: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                 groups: int) -> None:
        layers = block_shape[0]
        # group 0 is one layer: the forward pass waits for its copies before computing
        # anything; the others are split evenly (each copies while the previous computes)
        rest = min(groups, layers) - 1
        edges = [0, *(1 + (layers - 1) * g // rest for g in range(rest + 1))] if rest else [
            0, layers]
        self.bounds = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]
        self.parts = [torch.zeros((num, b - a, *block_shape[1:]), dtype=dtype, pin_memory=pin)
                      for a, b in self.bounds]

    def __len__(self) -> int:
        return self.parts[0].shape[0]

    def block(self, slot: int) -> torch.Tensor:
        """One slot as ``[layers, 2, bs, heads, dim]`` (a copy unless there is one group)."""
        if len(self.parts) == 1:
            return self.parts[0][slot]
        return torch.cat([part[slot] for part in self.parts])


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """``(row, first slot, length)`` for each run of consecutive values in ``slots``."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if runs and slot == runs[-1][1] + runs[-1][2]:
            r, first, n = runs[-1]
            runs[-1] = (r, first, n + 1)
        else:
            runs.append((row, slot, 1))
    return runs


class LayerCopies:
    """One step's host copies on CUDA, issued a layer group ahead of the forward pass: before
    layer ``first`` of group g computes, ``wait`` issues group g+1's copies (CPU work now
    overlapped with the GPU computing group g) and makes the compute stream wait for group
    g's event. ``groups``: one callable per layer group of ``bounds`` (gathers of blocks to
    store, host -> device loads; returns its event), ``after``: what to issue after them (the
    stores' copies to host); all run on ``stream``."""

    def __init__(self, stream: Any, bounds: list[tuple[int, int]],
                 groups: list[Callable[[], Any]], after: list[Callable[[], Any]]) -> None:
        self.stream = stream
        self.groups = {first: g for g, (first, _) in enumerate(bounds)}
        self.stages = [*groups, *after]
        self.events: list[Any] = []

    def issue(self, n: int) -> None:
        """Run the stages up to the ``n``-th (each at most once)."""
        with torch.cuda.stream(self.stream):
            while len(self.events) < min(n, len(self.stages)):
                self.events.append(self.stages[len(self.events)]())

    def wait(self, layer: int) -> None:
        g = self.groups.get(layer)
        if g is not None:
            self.issue(g + 2)
            torch.cuda.current_stream().wait_event(self.events[g])

    def wait_all(self) -> None:
        self.finish()
        for g in self.groups.values():
            torch.cuda.current_stream().wait_event(self.events[g])

    def finish(self) -> None:
        """Issue whatever the forward pass did not reach (a step that ran no layer)."""
        self.issue(len(self.stages))


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
        # one side stream for every copy: the stores' copies to host queue behind the step's
        # loads, which the forward pass waits for (on a stream of their own they competed
        # with the loads for PCIe and slowed the step down)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host = self._host_pool(config.cache.host_cache_gib, cuda)
        self.disk: DiskStore | None = None
        self.num_disk_blocks, self.disk_keys, self.corrupt = 0, [], 0
        if config.cache.disk_cache_dir:
            self._open_disk(config, fingerprint)
        # reads get their own threads: a load never queues behind a backlog of writes
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-write")
        self.io_read = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-read")
        self.pending: list[_Pending] = []
        self.copies: list[_CopyBatch] = []

    def _host_pool(self, gib: float, pin: bool) -> HostPool | None:
        num = int(gib * GIB // self.block_bytes)
        if num <= 0:
            return None
        logger.info("host KV tier: %d blocks (%.2f GiB)%s", num, num * self.block_bytes / GIB,
                    ", pinned" if pin else "")
        return HostPool(num, self.block_shape, self.dtype, pin, LOAD_GROUPS)

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
        return 0 if self.host is None else len(self.host)

    # ------------------------------------------------------------------ block access
    def _ids(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long).to(self.device, non_blocking=True)

    def _gather(self, ids: torch.Tensor, layers: tuple[int, int]) -> torch.Tensor:
        """Device blocks ``ids`` of ``layers`` as ``[n, layers, 2, bs, heads, dim]`` (new,
        contiguous, same device): one index op per layer, however many blocks."""
        return torch.stack([self.kv[i].index_select(1, ids).transpose(0, 1)
                            for i in range(*layers)], dim=1)

    def _scatter(self, ids: torch.Tensor, data: torch.Tensor, layers: tuple[int, int]) -> None:
        """``data`` ``[n, layers, 2, ...]`` (on the device) into device blocks ``ids``."""
        for i in range(*layers):
            self.kv[i].index_copy_(1, ids, data[:, i - layers[0]].transpose(0, 1))

    @staticmethod
    def _to_bytes(t: torch.Tensor) -> memoryview:
        return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")

    def _from_bytes(self, data: bytes) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw.view(self.dtype).view(self.block_shape)

    # ------------------------------------------------------------------ one step
    def before_step(self, step: SchedulerOutput) -> tuple[list[KVDone], LayerCopies | None]:
        """Issue the step's ops (in the documented order); return those already finished and,
        on CUDA with host copies (loads, stores to host), the ``LayerCopies`` the forward pass
        waits on (None: none)."""
        done: list[KVDone] = []
        for key in step.kv_deletes:
            if self.disk is not None:
                self.disk.delete(key)
        ready = self._copies(step, done) if step.kv_stores or step.kv_loads else None
        done.extend(self.poll())
        return done, ready

    def _copies(self, step: SchedulerOutput, done: list[KVDone]) -> LayerCopies | None:
        """Stores, then loads; on CUDA on the side stream, which waits for the forward passes
        before it. Layer group by layer group, the gathers of blocks to store in host (before
        a load or this step's forward pass overwrites them) and the host loads, issued one
        group ahead of the forward pass, whose layers wait for their group (``LayerCopies``);
        the stores' copies to host after the last group. On the CPU everything is done
        before returning."""
        if self.stream is None:
            groups, after = self._stages(step, done)
            for stage in (*groups, *after):
                stage()
            return None
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            groups, after = self._stages(step, done)
            main.wait_event(self._record())  # the gathers of stores straight to disk
        if not groups:
            return None
        copies = LayerCopies(self.stream, self.host.bounds if self.host else [], groups, after)
        copies.issue(1)  # group 0 before the forward pass starts
        return copies

    def _stages(self, step: SchedulerOutput, done: list[KVDone]
                ) -> tuple[list[Callable[[], Any]], list[Callable[[], Any]]]:
        """Issue now: flushes from host (written by the I/O threads straight from the pinned
        pool), stores straight to disk (gathered, then copied to the CPU), disk reads.
        Return the rest: one stage per layer group (the group's gathers of the blocks to
        store in host, then its host loads; returns an event after them) and the stores'
        copies to host, after every group."""
        for op in step.kv_stores:
            if op.src == "host":
                self._store_to_disk(op, None, done)
        from_device = [op for op in step.kv_stores if op.src != "host"]
        to_host = sorted((op for op in from_device if op.dst == "host"),
                         key=lambda op: op.dst_slot)
        to_disk = [op for op in from_device if op.dst != "host"]
        if to_disk:
            ids = self._ids([op.src_slot for op in to_disk])
            for op, data in zip(to_disk, self._gather(ids, (0, len(self.kv))), strict=True):
                self._store_to_disk(op, data, done)
        for op in step.kv_loads:
            if op.src != "host":
                self._load_from_disk(op, done)
        loads = [op for op in step.kv_loads if op.src == "host"]
        if self.host is None or not (to_host or loads):
            return [], []
        host = self.host
        load = self._host_loads(loads, done)
        store_ids = self._ids([op.src_slot for op in to_host]) if to_host else None
        gathered: list[torch.Tensor] = []

        def stage(g: int) -> Any:
            if store_ids is not None:
                gathered.append(self._gather(store_ids, host.bounds[g]))
            return load(g) if load is not None else self._record()

        groups = [functools.partial(stage, g) for g in range(len(host.parts))]
        after = [lambda: self._copy_to_host(to_host, gathered, done)] if to_host else []
        return groups, after

    def _host_loads(self, loads: list[KVTransfer], done: list[KVDone]
                    ) -> Callable[[int], Any] | None:
        """Host -> device of layer group g, for g = 0, 1, ... in order: the group's runs of
        consecutive host slots are copied into a staging tensor and scattered into the
        device blocks; the last group marks the batch's completion. Returns the group's
        event (CUDA)."""
        if not loads:
            return None
        assert self.host is not None
        host = self.host
        loads = sorted(loads, key=lambda op: op.src_slot)
        runs = slot_runs([op.src_slot for op in loads])
        ids = self._ids([op.dst_slot for op in loads])
        spans: list[Any] = []

        def copy(g: int) -> None:
            part = host.parts[g]
            staged = torch.empty((len(loads), *part.shape[1:]), dtype=self.dtype,
                                 device=self.device)
            for row, slot, n in runs:
                staged[row:row + n].copy_(part[slot:slot + n], non_blocking=True)
            self._scatter(ids, staged, host.bounds[g])

        def group(g: int) -> Any:
            self._timed(spans, functools.partial(copy, g))
            if g == len(host.parts) - 1:
                self._finish_copies(loads, done, spans)
            return spans[-1][1] if self.stream is not None else None

        return group

    def _copy_to_host(self, ops: list[KVTransfer], gathered: list[torch.Tensor],
                      done: list[KVDone]) -> None:
        """The gathered blocks ``ops`` store into their host slots (``ops`` by slot)."""
        assert self.host is not None
        runs = slot_runs([op.dst_slot for op in ops])

        def copy() -> None:
            for part, data in zip(self.host.parts, gathered, strict=True):
                for row, slot, n in runs:
                    part[slot:slot + n].copy_(data[row:row + n], non_blocking=True)

        spans: list[Any] = []
        self._timed(spans, copy)
        self._finish_copies(ops, done, spans)

    def after_step(self, idle: bool) -> list[KVDone]:
        """Transfers that finished meanwhile; an idle step waits briefly for disk I/O."""
        futures = [p.future for p in self.pending if p.future is not None and not p.future.done()]
        if idle and futures:
            wait(futures, timeout=IDLE_WAIT_S, return_when="FIRST_COMPLETED")
        return self.poll()

    def _store_to_disk(self, op: KVTransfer, data: torch.Tensor | None,
                       done: list[KVDone]) -> None:
        """Write one block to disk in the I/O pool: ``data`` (a gathered device block, copied
        to the CPU behind an event) or, for None, the host slot ``op.src_slot`` read by the
        I/O thread itself (the slot is pinned in the host index until this op completes)."""
        if self.disk is None:
            done.append(KVDone(op.op_id, False, "the disk tier is off"))
            return
        event = None
        if data is not None:
            data = data.to("cpu", copy=True, non_blocking=self.stream is not None)
            event = self._record()
        self.pending.append(_Pending(op, self.io.submit(self._write, op, data, event)))

    def _write(self, op: KVTransfer, data: torch.Tensor | None, event: Any) -> float:
        if event is not None:
            event.synchronize()
        if data is None:
            assert self.host is not None
            data = self.host.block(op.src_slot)
        assert self.disk is not None
        start = time.perf_counter()
        self.disk.write(op.key, self._to_bytes(data))
        return time.perf_counter() - start

    def _load_from_disk(self, op: KVTransfer, done: list[KVDone]) -> None:
        if self.disk is None:
            done.append(KVDone(op.op_id, False, "the disk tier is off"))
        else:
            self.pending.append(_Pending(op, self.io_read.submit(self._read, op.key)))

    def _read(self, key: bytes) -> tuple[torch.Tensor, float]:
        assert self.disk is not None
        start = time.perf_counter()
        data = self._from_bytes(self.disk.read(key))
        return data, time.perf_counter() - start

    def _record(self, timing: bool = False) -> Any:
        """An event recorded on the side stream; None on the CPU."""
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(self.stream)
        return event

    def _timed(self, spans: list[Any], copy: Callable[[], None]) -> None:
        """Issue ``copy`` between two timing events (CUDA; appends the pair to ``spans``) or
        time it on the clock (CPU, where copies are done when issued; appends seconds)."""
        if self.stream is None:
            start = time.perf_counter()
            copy()
            spans.append(time.perf_counter() - start)
        else:
            started = self._record(timing=True)
            copy()
            spans.append((started, self._record(timing=True)))

    def _finish_copies(self, ops: list[KVTransfer], done: list[KVDone],
                       spans: list[Any]) -> None:
        """``ops`` were copied as one batch in ``spans``: done now on the CPU, when the last
        span's event fires on CUDA. Each op is charged its share of the time inside the spans
        (not the gaps between them, where the copies wait for the forward pass to reach
        the next layer group)."""
        if self.stream is None:
            seconds = sum(spans) / len(ops)
            done.extend(KVDone(op.op_id, True, seconds=seconds) for op in ops)
        else:
            self.copies.append(_CopyBatch(ops, spans))

    # ------------------------------------------------------------------ completions
    def poll(self) -> list[KVDone]:
        """Finished transfers; a finished disk read is copied into its device block first."""
        done: list[KVDone] = []
        running: list[_CopyBatch] = []
        for batch in self.copies:
            if not batch.event.query():
                running.append(batch)
                continue
            ms = sum(start.elapsed_time(end) for start, end in batch.spans)
            seconds = ms / 1e3 / len(batch.ops)
            done.extend(KVDone(op.op_id, True, seconds=seconds) for op in batch.ops)
        self.copies = running
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
                    staged = p.staged.to(self.device, non_blocking=True)[None]
                    self._scatter(self._ids([p.op.dst_slot]), staged, (0, len(self.kv)))
                p.staged, p.event = None, self._record()
            if p.event is not None and not p.event.query():
                still.append(p)
                continue
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
        self.io_read.shutdown(wait=True)


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
        done, copies = self.tiers.before_step(step)
        self.runner.layer_ready = copies
        try:
            out = self.runner.execute(step)
        finally:
            if copies is not None:
                copies.finish()  # what the forward pass did not reach
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
