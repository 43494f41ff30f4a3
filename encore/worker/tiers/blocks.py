"""The device KV pool seen as whole blocks (all layers of a block id at once).

KV per layer: ``[2, blocks, bs, heads, dim]``; a gathered block is
``[layers, 2, bs, heads, dim]``; the lower tiers hold it encoded by ``codec`` as
``[layers, layer_bytes]`` uint8 (``tier_block_bytes`` in all). On CUDA every tier copy, and
the codec around it, runs on one side ``stream``: encoded before a copy to the CPU, decoded
after a copy to the device (fewer bytes cross PCIe), by the fused kernels of
``kernels/kv_codec.py`` (one launch per layer group and direction; the torch codec's
passes, with their fp32 temporaries, competed with the forward pass for the SMs). On the CPU
``stream`` is None, copies are done when issued, events are None, and blocks to or from disk
and remote are encoded and decoded by the I/O threads (off the step's path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from encore.worker.tiers.codec import KVCodec


class DeviceBlocks:
    """Gathers and scatters whole blocks of ``kv_caches``; records events on ``stream``."""

    def __init__(self, kv_caches: list[torch.Tensor], codec: str = "none") -> None:
        self.kv = kv_caches
        first = kv_caches[0]
        self.device = first.device
        self.block_shape = (len(kv_caches), 2, *first.shape[2:])
        self.dtype = first.dtype
        self.block_bytes = first[:, 0].numel() * first.element_size() * len(kv_caches)
        self.codec = KVCodec(codec, self.block_shape[1:], self.dtype)
        self.tier_block_bytes = self.codec.layer_bytes * len(kv_caches)
        self._ptrs: torch.Tensor | None = None  # the layers' addresses (fused codec, CUDA)
        # one side stream for every copy: the stores' copies to host queue behind the step's
        # loads, which the forward pass waits for (on a stream of their own they competed
        # with the loads for PCIe and slowed the step down)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    def ids(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long).to(self.device, non_blocking=True)

    def gather(self, ids: torch.Tensor, layers: tuple[int, int]) -> torch.Tensor:
        """Device blocks ``ids`` of ``layers`` as ``[n, layers, 2, bs, heads, dim]`` (new,
        contiguous, same device): one index op per layer, however many blocks."""
        return torch.stack([self.kv[i].index_select(1, ids).transpose(0, 1)
                            for i in range(*layers)], dim=1)

    def scatter(self, ids: torch.Tensor, data: torch.Tensor, layers: tuple[int, int]) -> None:
        """``data`` ``[n, layers, 2, ...]`` (on the device) into device blocks ``ids``."""
        for i in range(*layers):
            self.kv[i].index_copy_(1, ids, data[:, i - layers[0]].transpose(0, 1))

    def _fused(self) -> torch.Tensor | None:
        """The layers' addresses when the fused codec kernels run (CUDA, int8/int4)."""
        if self.stream is None or not self.codec.bits:
            return None
        if self._ptrs is None:
            from encore.kernels.rope import layer_pointers  # not at import: TRITON_INTERPRET
            self._ptrs = layer_pointers(self.kv)
        return self._ptrs

    def warm_up(self, group_sizes: list[int]) -> None:
        """Compile the fused codec kernels now, for every layer-group size the copies use,
        on a scratch block (compiling at the first tier hit stalled a request by ~1 s)."""
        if self._fused() is None:
            return
        from encore.kernels.kv_codec import decode_scatter, gather_encode
        from encore.kernels.rope import layer_pointers
        with torch.cuda.stream(self.stream):
            for n in group_sizes:
                scratch = [torch.zeros_like(self.kv[0][:, :1]) for _ in range(n)]
                ptrs, ids = layer_pointers(scratch), self.ids([0])
                payload = gather_encode(scratch, ptrs, ids, self.codec.bits)
                decode_scatter(payload, scratch, ptrs, ids, self.codec.bits)
        torch.cuda.synchronize(self.device)

    def encode(self, ids: torch.Tensor, layers: tuple[int, int]) -> torch.Tensor:
        """Device blocks ``ids`` of ``layers`` encoded: ``[n, layers, layer_bytes]`` uint8 on
        the device."""
        ptrs = self._fused()
        if ptrs is None:
            return self.codec.encode(self.gather(ids, layers))
        from encore.kernels.kv_codec import gather_encode
        a, b = layers
        return gather_encode(self.kv[a:b], ptrs[a:b], ids, self.codec.bits)

    def decode(self, ids: torch.Tensor, payload: torch.Tensor, layers: tuple[int, int]) -> None:
        """Encoded ``payload`` ``[n, layers, layer_bytes]`` (on the device) into device blocks
        ``ids``."""
        ptrs = self._fused()
        if ptrs is None:
            self.scatter(ids, self.codec.decode(payload), layers)
            return
        from encore.kernels.kv_codec import decode_scatter
        a, b = layers
        decode_scatter(payload.contiguous(), self.kv[a:b], ptrs[a:b], ids, self.codec.bits)

    def stage_out(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        """Device blocks ``ids`` on their way to disk or remote, one CPU tensor per block for
        the I/O threads (``payload``), and the event after which they hold their bytes: on
        CUDA encoded here and copied to the CPU; on the CPU gathered as they are (None:
        ready)."""
        every = (0, self.num_layers)
        if self.stream is None:
            return list(self.gather(ids, every)), None
        staged = self.encode(ids, every).to("cpu", non_blocking=True)
        return list(staged), self.record()

    def payload(self, block: torch.Tensor) -> memoryview:
        """A block from ``stage_out`` as the bytes to write (the CPU: encoded here, by the
        I/O thread that calls this)."""
        if self.stream is None:
            block = self.codec.encode(block[None])[0]
        return self.as_bytes(block)

    @staticmethod
    def as_bytes(payload: torch.Tensor) -> memoryview:
        """An encoded block (CPU, uint8: a host slot, ``payload``) as bytes."""
        return payload.contiguous().numpy().data.cast("B")

    def from_payload(self, data: bytes) -> torch.Tensor:
        """Bytes read by an I/O thread as ``copy_in`` takes them: on the CPU decoded here
        (``[layers, 2, ...]``), on CUDA the payload (``[layers, layer_bytes]``), decoded on the
        device after its copy."""
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        payload = raw.view(1, self.num_layers, self.codec.layer_bytes)
        return payload[0] if self.stream is not None else self.codec.decode(payload)[0]

    def copy_in(self, data: torch.Tensor, block: int) -> Any:
        """One whole block read from a file or a store (``from_payload``) into device block
        ``block``, on the side stream; returns the event it completes (None: done)."""
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with ctx:
            staged = data.to(self.device, non_blocking=True)[None]
            every = (0, self.num_layers)
            if self.stream is not None:
                self.decode(self.ids([block]), staged, every)
            else:
                self.scatter(self.ids([block]), staged, every)
        return self.record()

    def record(self, timing: bool = False) -> Any:
        """An event recorded on the side stream; None on the CPU."""
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(self.stream)
        return event

    def timed(self, spans: list[Any], copy: Callable[[], None]) -> None:
        """Issue ``copy`` between two timing events (CUDA; appends the pair to ``spans``) or
        time it on the clock (CPU, where copies are done when issued; appends seconds)."""
        if self.stream is None:
            start = time.perf_counter()
            copy()
            spans.append(time.perf_counter() - start)
        else:
            started = self.record(timing=True)
            copy()
            spans.append((started, self.record(timing=True)))
