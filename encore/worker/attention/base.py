"""The attention backend interface: what a model layer asks of attention over paged KV.

KV cache of one layer: a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K at index 0, V at 1), in the model's dtype or fp8 (``cache.kv_cache_dtype``: K / k_scale and
V / v_scale, per-tensor scales of the layer). A token at position ``p`` of a sequence lives in block
``block_table[p // block_size]`` at offset ``p % block_size``; its flat slot is
``block * block_size + offset``.

One step packs the new tokens of all sequences into one flat batch of T tokens:

    seq 0: [start_pos0 ... start_pos0+q0)   seq 1: [start_pos1 ... +q1)   ...
    query_start_loc = [0, q0, q0+q1, ...]   seq_lens = start_pos + q (context after the step)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

import torch


class LayerWaits(Protocol):
    """A step's tier copies the forward pass waits for (CUDA; ``tiers.host_copies``)."""

    def wait(self, layer: int) -> None:
        """Before computing ``layer``: wait for the copies that layer reads."""

    def wait_all(self) -> None:
        """Wait for every copy of the step."""


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch (tensors on the model's device)."""

    query_lens: list[int]  # new tokens per sequence
    start_pos: list[int]  # tokens already cached per sequence (computed before this step)
    query_start_loc: torch.Tensor  # [B+1] int32, prefix sums of query_lens
    seq_lens: torch.Tensor  # [B] int32, start_pos + query_len
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, flat slot of every new token
    max_query_len: int
    max_seq_len: int
    # Blending only: [T] int32 positions of the rows when they are not each sequence's last
    # query_len tokens (ascending per sequence); row i then sees keys [0, q_positions[i]].
    q_positions: torch.Tensor | None = None
    # Host-tier copies of this step (CUDA; gathers of blocks to store, loads):
    # ``layer_ready.wait(i)`` before computing layer i (issues the next layer group's copies,
    # waits for layer i's). Models with ``waits_per_layer`` honour it.
    layer_ready: LayerWaits | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(abc.ABC):
    """Writes the new K/V into the paged cache, then attends (causal, GQA)."""

    name: str = "abstract"

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]  (after RoPE)
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,  # an fp8 kv_cache holds K / k_scale and V / v_scale
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Attention output for every new token; mutates ``kv_cache`` at ``meta.slot_mapping``."""

    @abc.abstractmethod
    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        kv_cache: torch.Tensor,  # the new tokens' K/V already written at meta.slot_mapping
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """``forward`` without the write (a caller that wrote the K/V itself)."""
