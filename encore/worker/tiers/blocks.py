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
        self.all_layers = (0, len(kv_caches))  # a disk or remote copy moves them at once
        # the addresses of layers [a, b) (fused codec, CUDA), one tensor each: a slice of one
        # tensor starting at an odd layer is not 16-byte aligned, and Triton compiles another
        # kernel variant for such a pointer (at the first tier hit, ~0.6 s)
        self._ptrs: dict[tuple[int, int], torch.Tensor] = {}
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

    @property
    def fused_codec(self) -> bool:
        """Whether the fused codec kernels encode and decode (CUDA, int8/int4)."""
        return self.stream is not None and bool(self.codec.bits)

    def _fused(self, layers: tuple[int, int]) -> torch.Tensor | None:
        """The addresses of ``layers`` when the fused codec kernels run."""
        if not self.fused_codec:
            return None
        ptrs = self._ptrs.get(layers)
        if ptrs is None:
            from encore.kernels.rope import layer_pointers  # not at import: TRITON_INTERPRET
            ptrs = self._ptrs[layers] = layer_pointers(self.kv[layers[0]:layers[1]])
        return ptrs

    def warm_up(self, groups: list[tuple[int, int]]) -> None:
        """Compile the fused codec kernels now, for every layer group the copies use, by one
        round trip of block 0 through them (compiling at the first tier hit stalled requests
        by ~1 s; the pool holds nothing yet, and a round trip only rounds block 0 to the
        codec)."""
        if not self.fused_codec:
            return
        ids = self.ids([0])
        with torch.cuda.stream(self.stream):
            for layers in groups:
                self.decode(ids, self.encode(ids, layers), layers)
        torch.cuda.synchronize(self.device)

    def encode(self, ids: torch.Tensor, layers: tuple[int, int]) -> torch.Tensor:
        """Device blocks ``ids`` of ``layers`` encoded: ``[n, layers, layer_bytes]`` uint8 on
        the device."""
        ptrs = self._fused(layers)
        if ptrs is None:
            return self.codec.encode(self.gather(ids, layers))
        from encore.kernels.kv_codec import gather_encode
        return gather_encode(self.kv[layers[0]:layers[1]], ptrs, ids, self.codec.bits)

    def decode(self, ids: torch.Tensor, payload: torch.Tensor, layers: tuple[int, int]) -> None:
        """Encoded ``payload`` ``[n, layers, layer_bytes]`` (on the device) into device blocks
        ``ids``."""
        ptrs = self._fused(layers)
        if ptrs is None:
            self.scatter(ids, self.codec.decode(payload), layers)
            return
        from encore.kernels.kv_codec import decode_scatter
        decode_scatter(payload.contiguous(), self.kv[layers[0]:layers[1]], ptrs, ids,
                       self.codec.bits)

    def stage_out(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        """Device blocks ``ids`` on their way to disk or remote, one CPU tensor per block for
        the I/O threads (``payload``), and the event after which they hold their bytes: on
        CUDA encoded here and copied to the CPU; on the CPU gathered as they are (None:
        ready)."""
        if self.stream is None:
            return list(self.gather(ids, self.all_layers)), None
        staged = self.encode(ids, self.all_layers).to("cpu", non_blocking=True)
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
            if self.stream is not None:
                self.decode(self.ids([block]), staged, self.all_layers)
            else:
                self.scatter(self.ids([block]), staged, self.all_layers)
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
