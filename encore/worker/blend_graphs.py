"""CUDA graphs of a blend's kept-row layers (the layers after the check layer).

Past the check layer a blend computes a few hundred scattered rows through every remaining
layer; each layer is ~10 small kernels, so an eager loop is bound by the CPU launching them
(measured on an H200, llama-3-8b shape: 14 ms of launches for 17 ms of GPU work). The shapes
depend only on the number of kept rows, so the loop is captured once per padded row count and
replayed:

    rows  [0, m)        the kept rows: hidden state, residual, position, slot
    rows  [m, padded)   padding: zero state, the last row's position (a finite attention
                        over real keys, discarded), slot -1 (the KV write skips it)

Captured lazily, on the first blend whose kept rows fit a bucket; all graphs share one memory
pool. Graph inputs are static buffers sized for the largest bucket; attention metadata under
capture holds the bucket as ``max_query_len`` (the prefill kernel's grid).
"""

from __future__ import annotations

import torch

from encore.worker.attention.base import AttentionMetadata
from encore.worker.models.llama import LlamaForCausalLM
from encore.worker.models.ops import TritonOps

BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class KeptRowGraphs:
    """Captured kept-row layer loops of ``model`` over ``kv_caches``; ``run`` replays one."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor],
                 max_blocks: int) -> None:
        assert isinstance(model.ops, TritonOps)
        self.model, self.ops, self.kv_caches = model, model.ops, kv_caches
        dev, dtype = model.embed_tokens.device, model.embed_tokens.dtype
        top, d = BUCKETS[-1], model.arch.hidden_size
        self.x = torch.zeros(top, d, dtype=dtype, device=dev)
        self.residual = torch.zeros(top, d, dtype=dtype, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.q_positions = torch.zeros(top, dtype=torch.int32, device=dev)
        self.slots = torch.full((top,), -1, dtype=torch.long, device=dev)
        self.table = torch.zeros(1, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
        self.query_start_loc = {b: torch.tensor([0, b], dtype=torch.int32, device=dev)
                                for b in BUCKETS}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                 torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def bucket(m: int) -> int | None:
        return next((b for b in BUCKETS if b >= m), None)

    def run(self, first_layer: int, x: torch.Tensor, residual: torch.Tensor,
            positions: torch.Tensor, slots: torch.Tensor, table: torch.Tensor,
            total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``first_layer..`` for the m rows given; returns (x, residual) [m, d]."""
        m = x.shape[0]
        size = self.bucket(m)
        assert size is not None and table.shape[0] <= self.table.shape[1]
        self.x[:m].copy_(x)
        self.x[m:size].zero_()
        self.residual[:m].copy_(residual)
        self.residual[m:size].zero_()
        self.positions[:m].copy_(positions)
        self.positions[m:size].fill_(total - 1)
        self.q_positions[:size].copy_(self.positions[:size])
        self.slots[:m].copy_(slots)
        self.slots[m:size].fill_(-1)
        self.table[0, :table.shape[0]].copy_(table)
        self.table[0, table.shape[0]:].zero_()
        self.seq_lens.fill_(total)
        key = (first_layer, size)
        if key not in self.graphs:
            self.graphs[key] = self._capture(first_layer, size)
        graph, x_out, residual_out = self.graphs[key]
        graph.replay()
        return x_out[:m], residual_out[:m]

    def _layers(self, first_layer: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work: layers ``first_layer..`` on the static buffers."""
        meta = AttentionMetadata(
            query_lens=[size], start_pos=[0], query_start_loc=self.query_start_loc[size],
            seq_lens=self.seq_lens, block_tables=self.table, slot_mapping=self.slots[:size],
            max_query_len=size, max_seq_len=size, q_positions=self.q_positions[:size])
        ops, x, residual = self.ops, self.x[:size], self.residual[:size].clone()
        positions = self.positions[:size]
        layers = list(self.model.layers)[first_layer:]
        for layer, cache in zip(layers, self.kv_caches[first_layer:], strict=True):
            h, residual = ops.add_rmsnorm(x, residual, layer.input_norm, layer.eps)
            q, k, v = layer.project_qkv_fused(h, positions, self.model.rope_inv_freq, ops)
            out = layer.attn.forward(q, k, v, cache, meta, layer.scale, layer.k_scale,
                                          layer.v_scale)
            x = layer.project_out_fused(out, ops)
            h, residual = ops.add_rmsnorm(x, residual, layer.post_norm, layer.eps)
            x = layer.mlp_fused(h, ops)
        return x, residual

    def _capture(self, first_layer: int, size: int
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        # warm-up on a side stream (Triton compiles, cuBLAS picks kernels), then capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._layers(first_layer, size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            x, residual = self._layers(first_layer, size)
        return graph, x, residual
