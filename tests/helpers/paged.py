"""Build paged-KV batches by hand: AttentionMetadata for a list of sequences and block tables.

caches = alloc_kv_caches(arch, num_blocks=64, block_size=4)
tables = [[0, 1, 2], [3, 4]]                     # blocks of seq 0, seq 1
batch = make_batch([(ids0, 0), (ids1, 5)], tables, block_size=4)
hidden = model(batch.input_ids, batch.positions, caches, batch.meta)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encore.worker.attention.base import AttentionMetadata
from encore.worker.models.arch import ModelArch
from encore.worker.models.llama import kv_cache_shape


@dataclass
class PagedBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata

    @property
    def last_token_rows(self) -> torch.Tensor:
        """Row index of each sequence's last new token in the flat batch."""
        return (self.meta.query_start_loc[1:] - 1).long()


def make_metadata(
    seqs: list[tuple[int, int]],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for sequences given as (num_new_tokens, start_pos), with their block tables."""
    qlens = [q for q, _ in seqs]
    starts = [s for _, s in seqs]
    for (q, s), table in zip(seqs, block_tables, strict=True):
        need = (s + q + block_size - 1) // block_size
        if len(table) < need:
            raise ValueError(f"block table {table} too short for {s + q} tokens")
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    slots = [
        table[p // block_size] * block_size + p % block_size
        for (q, s), table in zip(seqs, block_tables, strict=True)
        for p in range(s, s + q)
    ]
    loc = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionMetadata(
        query_lens=qlens,
        start_pos=starts,
        query_start_loc=loc.to(device),
        seq_lens=torch.tensor([s + q for q, s in seqs], dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(qlens),
        max_seq_len=max(s + q for q, s in seqs),
    )


def make_batch(
    seqs: list[tuple[list[int], int]],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> PagedBatch:
    """A flat batch for sequences given as (new token ids, start_pos)."""
    ids = [t for toks, _ in seqs for t in toks]
    pos = [p for toks, s in seqs for p in range(s, s + len(toks))]
    meta = make_metadata([(len(t), s) for t, s in seqs], block_tables, block_size, device)
    return PagedBatch(
        torch.tensor(ids, dtype=torch.int64, device=device),
        torch.tensor(pos, dtype=torch.int64, device=device),
        meta,
    )


def alloc_kv_caches(
    arch: ModelArch,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """One zeroed paged KV cache per layer."""
    shape = kv_cache_shape(arch, num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]


def disjoint_block_tables(lengths: list[int], block_size: int, first: int = 0) -> list[list[int]]:
    """Consecutive, non-overlapping block tables able to hold ``lengths`` tokens each."""
    tables, nxt = [], first
    for n in lengths:
        k = (n + block_size - 1) // block_size
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    return tables
