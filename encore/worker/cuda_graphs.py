"""CUDA graphs of the decode forward: one graph per (padded batch size, context bucket),
captured at start-up.

A decode-only step (every sequence brings exactly one token) has the same kernels in the same
order for a given batch size; only the inputs change. So the runner keeps static device
buffers, captures ``model(...)`` once per (size, bucket), and per step copies the real rows into
the buffers (pinned staging, a few async copies) and replays. The staging alternates between
two buffers: under asynchronous scheduling a step is prepared while the last one's copies may
still be queued (the one before it has been waited for).

    rows  [0, n)        real sequences: token, position, slot, seq_len, block table
    rows  [n, padded)   padding: token 0, position 0, slot -1 (KV write skips it),
                        seq_len 1 (attends to one key of block 0: finite, discarded)

Each graph also computes the rows' logits (fp32, into one static buffer) and their argmax,
so a greedy step needs no kernel launch after the replay: the sampler reads ``argmax`` (one
device-to-host copy, the step's one sync) unless a row changes its logits or samples.

Attention metadata under capture carries host ints that must not depend on the step:
``max_seq_len`` is the graph's context bucket (it picks the decode kernel's split count, fixed
at capture), ``query_lens``/``start_pos`` are never read by the triton decode path. Small
batches get one graph per bucket, so a short context runs the split count its length calls
for instead of the one the model's context limit calls for (at batch 1 with an 8k limit:
33 splits, 30 of them empty at 144 tokens, and a reduce over all 33):

    sizes <= BUCKETED_MAX_SIZE   buckets 128, 256, 512, ..., max_model_len
                                 (batch 1, llama-3-8b: 1, 2, 4, 8, 16, 32, 33 splits)
    larger sizes                 max_model_len only (splits there are few: 264 programs
                                 / (size x kv heads))

Buckets are powers of two because the decode kernel's split count is a function of the
power-of-two ceiling of the context: a replay and an eager step at the same context run the
same kernels.

A step replays the graph of the smallest bucket >= its longest context (start_pos + 1, known
on the host). All graphs share one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from encore.worker.attention.base import AttentionMetadata


def argmax_rows(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, -1, out=out)`` for logits [n, V], in two passes when V has a
    divisor L in [1024, 4096]: max over [n, V/L, L] (many rows in parallel), then the first
    chunk holding the row's max. One pass over a 128k row runs in one block (28 us on an
    H200 at batch 1; the two passes' five small kernels take 15 us). Ties go to the first
    index either way (torch.max and torch.argmax both return the first maximal index)."""
    n, v = logits.shape
    chunk = next((d for d in range(1024, 4097) if v % d == 0), None)
    if chunk is None:
        return torch.argmax(logits, dim=-1, out=out)
    vals, idx = logits.view(n, v // chunk, chunk).max(dim=-1)  # [n, C]
    best = vals.argmax(dim=-1, keepdim=True)  # [n, 1]
    return torch.add(best.squeeze(1) * chunk, idx.gather(1, best).squeeze(1), out=out)


BUCKETED_MAX_SIZE = 8  # padded sizes up to this get one graph per context bucket
SMALLEST_BUCKET = 128


def context_buckets(max_model_len: int) -> list[int]:
    """Powers of two from SMALLEST_BUCKET below ``max_model_len``, then ``max_model_len``."""
    buckets, b = [], SMALLEST_BUCKET
    while b < max_model_len:
        buckets.append(b)
        b *= 2
    return buckets + [max_model_len]


def padded_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """Captured decode forwards of ``model`` over ``kv_caches``; ``run`` replays one."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor],
                 max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.sizes = padded_sizes(max_num_seqs)
        dev = kv_caches[0].device
        size, width = self.sizes[-1], (max_model_len + block_size - 1) // block_size
        # One int64 staging row per scalar field: ids, positions, slots, seq_lens; two sets.
        self.staging = [(torch.zeros(4, size, dtype=torch.int64, pin_memory=True),
                         torch.zeros(size, width, dtype=torch.int32, pin_memory=True))
                        for _ in range(2)]
        self.turn = 0
        self.scalars = torch.zeros(4, size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(size, width, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=dev)
        vocab = model.arch.vocab_size
        self.logits = torch.empty(size, vocab, dtype=torch.float32, device=dev)
        self.argmax = torch.zeros(size, dtype=torch.int64, device=dev)
        self.buckets = context_buckets(max_model_len)
        # (padded size, context bucket) -> graph and its static hidden-state output
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = None

    def buckets_for(self, size: int) -> list[int]:
        """The context buckets captured for padded size ``size``."""
        return self.buckets if size <= BUCKETED_MAX_SIZE else [self.max_model_len]

    def bucket(self, size: int, context: int) -> int:
        """The smallest bucket of ``size`` holding ``context`` tokens (<= max_model_len)."""
        for b in self.buckets_for(size):
            if b >= context:
                return b
        raise ValueError(f"context {context} exceeds max_model_len {self.max_model_len}")

    def _meta(self, size: int, max_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_lens=[1] * size, start_pos=[0] * size,
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.tables[:size], slot_mapping=self.scalars[2, :size],
            max_query_len=1, max_seq_len=max_len)

    def _forward(self, size: int, max_len: int) -> torch.Tensor:
        """Hidden states; logits and their argmax land in the static buffers. The int32
        seq_lens are converted from the staged int64 row inside the graph (no extra launch
        per step)."""
        self.seq_lens[:size].copy_(self.scalars[3, :size])
        hidden = self.model(self.scalars[0, :size], self.scalars[1, :size], self.kv_caches,
                            self._meta(size, max_len))
        logits = self.model.compute_logits(hidden, out=self.logits[:size])
        argmax_rows(logits, self.argmax[:size])
        return hidden

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (padded size, bucket), largest first so smaller graphs reuse the
        first one's memory pool.

        The buffers hold padding rows while capturing (slot -1, seq_len 1): no KV is written.
        """
        self.scalars.zero_()
        self.scalars[2].fill_(-1)
        self.scalars[3].fill_(1)
        for size in reversed(self.sizes):
            for max_len in reversed(self.buckets_for(size)):
                self._capture_one(size, max_len)
        torch.cuda.synchronize()

    def _capture_one(self, size: int, max_len: int) -> None:
        self._forward(size, max_len)  # warm-up: compiles Triton kernels, picks cuBLAS algos
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[size, max_len] = self._forward(size, max_len)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[size, max_len] = graph

    def padded(self, n: int) -> int | None:
        """The smallest captured size holding ``n`` rows, or None when n is too large."""
        for size in self.sizes:
            if size >= n:
                return size
        return None

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], fill: Callable[[torch.Tensor], None] | None = None
            ) -> torch.Tensor:
        """Hidden states [n, d] of one decode step (n = len(ids) <= the largest size).

        Mutates the KV caches at ``slots``. The returned tensor is the graph's static output,
        as are ``logits[:n]`` and ``argmax[:n]``: read them before the next ``run``.
        ``fill``: writes placeholder ids into the device's ids [n] before the replay.
        """
        n = len(ids)
        size = self.padded(n)
        key = (size, self.bucket(size, max(positions) + 1))
        host_scalars, host_tables = self.staging[self.turn]
        self.turn ^= 1
        sc, tb = host_scalars.numpy(), host_tables.numpy()
        sc[0, :n], sc[1, :n], sc[2, :n] = ids, positions, slots
        sc[3, :n] = sc[1, :n] + 1
        sc[:, n:size] = 0
        sc[2, n:size] = -1
        sc[3, n:size] = 1
        for i, t in enumerate(tables):  # entries past a row's length are stale, never read
            tb[i, :len(t)] = t
        self.scalars.copy_(host_scalars, non_blocking=True)  # 4 x max rows: tiny
        self.tables[:size].copy_(host_tables[:size], non_blocking=True)
        if fill is not None:
            fill(self.scalars[0, :n])
        self.graphs[key].replay()
        return self.outputs[key][:n]
