"""Attention over paged KV with Triton kernels (the GPU backend).

Per step: the KV-write kernel stores the new K/V into their slots, then one attention
kernel reads everything it needs from the paged cache: the split-K decode kernel when
every sequence brings exactly one token, else the prefill/extend kernel (ragged, causal,
any cached prefix). Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (tests).
"""

from __future__ import annotations

import torch

from encore.kernels.decode_attention import decode_attention
from encore.kernels.kv_write import kv_write
from encore.kernels.prefill_attention import prefill_attention
from encore.worker.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    """Same contract as the torch backend; q, k, v share one dtype, kv_cache has it or fp8."""

    name = "triton"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        kv_write(kv_cache, k, v, meta.slot_mapping, k_scale, v_scale)
        return self.attend(q, kv_cache, meta, scale, k_scale, v_scale)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """``forward`` once the new K/V are in the cache (the fused model path writes them
        with RoPE: ``kernels.rope.rope_kv_write``)."""
        if meta.is_decode_only:
            return decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                    max_seq_len=meta.max_seq_len, k_scale=k_scale,
                                    v_scale=v_scale, pdl=True)  # seq_lens: set per step
        return prefill_attention(q, kv_cache, meta.block_tables, meta.query_start_loc,
                                 meta.seq_lens, scale, max_query_len=meta.max_query_len,
                                 q_positions=meta.q_positions, k_scale=k_scale,
                                 v_scale=v_scale)
