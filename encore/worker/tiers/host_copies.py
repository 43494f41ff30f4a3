"""Device <-> host copies of whole blocks, issued a layer group ahead of the forward pass.

The host pool holds blocks encoded (``DeviceBlocks.codec``): a group's gathered layers are
encoded on the device before their copy to host, a load's layers decoded on the device after
their copy from host. On CUDA every copy and the codec around it run on the side stream of
``DeviceBlocks``; a batch of copies completes through one event (hundreds of blocks move in a
step), timed by events around the copies (and a load's decode) only. On the CPU the copies
are memcpys, done when issued.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from encore.protocol.messages import KVDone, KVTransfer
from encore.worker.tiers.blocks import DeviceBlocks
from encore.worker.tiers.host_pool import HostPool, slot_runs

Stage = Callable[[], Any]  # issues some copies; returns an event after them (CUDA) or None


@dataclass
class _CopyBatch:
    """Host copies issued together on the side stream (CUDA): all done when ``event`` fires
    (one event per batch, not per block); each op is charged the batch's copy time (its
    spans) over the number of ops."""

    ops: list[KVTransfer]
    spans: list[tuple[Any, Any]]  # timing events around each part of the batch's copies

    @property
    def event(self) -> Any:
        return self.spans[-1][1]


class LayerCopies:
    """One step's host copies on CUDA, issued a layer group ahead of the forward pass: before
    layer ``first`` of group g computes, ``wait`` issues group g+1's copies (CPU work now
    overlapped with the GPU computing group g) and makes the compute stream wait for group
    g's event. ``groups``: one stage per layer group of ``bounds`` (gathers of blocks to
    store, host -> device loads), ``after``: what to issue after them (the stores' copies to
    host); all run on ``stream``. Implements the forward pass's ``LayerWaits``."""

    def __init__(self, stream: Any, bounds: list[tuple[int, int]], groups: list[Stage],
                 after: list[Stage]) -> None:
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


class HostCopies:
    """Moves blocks between the device pool and the host pool."""

    def __init__(self, blocks: DeviceBlocks, host: HostPool) -> None:
        self.blocks = blocks
        self.host = host
        self.copies: list[_CopyBatch] = []

    def stages(self, to_host: list[KVTransfer], loads: list[KVTransfer], done: list[KVDone]
               ) -> tuple[list[Stage], list[Stage]]:
        """One stage per layer group (the group's gathers of the blocks ``to_host``, then
        its host ``loads``; returns an event after them) and the stores' copies to host,
        after every group. ``to_host`` sorted by host slot. Nothing is issued yet."""
        if not (to_host or loads):
            return [], []
        host = self.host
        load = self._loads(loads, done)
        store_ids = self.blocks.ids([op.src_slot for op in to_host]) if to_host else None
        gathered: list[torch.Tensor] = []

        def stage(g: int) -> Any:
            if store_ids is not None:
                gathered.append(self.blocks.encode(store_ids, host.bounds[g]))
            return load(g) if load is not None else self.blocks.record()

        groups: list[Stage] = [functools.partial(stage, g) for g in range(len(host.parts))]
        after: list[Stage] = [lambda: self._copy_to_host(to_host, gathered, done)] if to_host \
            else []
        return groups, after

    def _loads(self, loads: list[KVTransfer], done: list[KVDone]
               ) -> Callable[[int], Any] | None:
        """Host -> device of layer group g, for g = 0, 1, ... in order: the group's runs of
        consecutive host slots are copied into a staging tensor, decoded and scattered into
        the device blocks; the last group marks the batch's completion. Returns the group's
        event (CUDA)."""
        if not loads:
            return None
        host, blocks = self.host, self.blocks
        loads = sorted(loads, key=lambda op: op.src_slot)
        runs = slot_runs([op.src_slot for op in loads])
        ids = blocks.ids([op.dst_slot for op in loads])
        spans: list[Any] = []

        def copy(g: int) -> None:
            part = host.parts[g]
            staged = torch.empty((len(loads), *part.shape[1:]), dtype=torch.uint8,
                                 device=blocks.device)
            for row, slot, n in runs:
                staged[row:row + n].copy_(part[slot:slot + n], non_blocking=True)
            blocks.decode(ids, staged, host.bounds[g])

        def group(g: int) -> Any:
            blocks.timed(spans, functools.partial(copy, g))
            if g == len(host.parts) - 1:
                self._finish(loads, done, spans)
            return spans[-1][1] if blocks.stream is not None else None

        return group

    def _copy_to_host(self, ops: list[KVTransfer], gathered: list[torch.Tensor],
                      done: list[KVDone]) -> None:
        """The gathered blocks ``ops`` store into their host slots (``ops`` by slot)."""
        runs = slot_runs([op.dst_slot for op in ops])

        def copy() -> None:
            for part, data in zip(self.host.parts, gathered, strict=True):
                for row, slot, n in runs:
                    part[slot:slot + n].copy_(data[row:row + n], non_blocking=True)

        spans: list[Any] = []
        self.blocks.timed(spans, copy)
        self._finish(ops, done, spans)

    def _finish(self, ops: list[KVTransfer], done: list[KVDone], spans: list[Any]) -> None:
        """``ops`` were copied as one batch in ``spans``: done now on the CPU, when the last
        span's event fires on CUDA. Each op is charged its share of the time inside the spans
        (not the gaps between them, where the copies wait for the forward pass to reach
        the next layer group)."""
        if self.blocks.stream is None:
            seconds = sum(spans) / len(ops)
            done.extend(KVDone(op.op_id, True, seconds=seconds) for op in ops)
        else:
            self.copies.append(_CopyBatch(ops, spans))

    def poll(self) -> list[KVDone]:
        """Batches of copies whose event has fired (CUDA)."""
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
        return done
