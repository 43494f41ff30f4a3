"""Size the CUDA KV pool from what is left after the weights and a profiling forward.

    budget = total * gpu_memory_utilization
             - peak bytes torch allocated (weights + the largest step's activations + logits)
             - bytes held outside torch's allocator (CUDA context, cuBLAS workspaces, ...)
             - GRAPH_RESERVE (the decode graphs' memory pool, captured after the pool exists,
                              and their static fp32 logits: max_num_seqs x vocab, 131 MB
                              for 256 x 128k)

The profiling forward is the largest step the scheduler can send: ``max_num_batched_tokens``
prefill tokens (split into sequences of at most ``max_model_len``), then logits and a
log-softmax for ``max_num_seqs`` rows. It runs over a one-block throwaway cache with every
slot -1, so nothing is written and every block-table entry points at that block.
"""

from __future__ import annotations

import torch

from encore.worker.attention.base import AttentionMetadata
from encore.worker.models.llama import kv_cache_shape

GRAPH_RESERVE = 512 * 1024**2


def profile_lengths(num_tokens: int, max_len: int) -> list[int]:
    """``num_tokens`` split into sequences of at most ``max_len`` tokens."""
    full, rest = divmod(num_tokens, max_len)
    return [max_len] * full + ([rest] if rest else [])


def _profile_meta(lens: list[int], block_size: int, device: torch.device) -> AttentionMetadata:
    width = (max(lens) + block_size - 1) // block_size
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionMetadata(
        query_lens=list(lens), start_pos=[0] * len(lens), query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(lens), width, dtype=torch.int32, device=device),
        slot_mapping=torch.full((sum(lens),), -1, dtype=torch.long, device=device),
        max_query_len=max(lens), max_seq_len=max(lens))


@torch.inference_mode()
def profile_peak_bytes(runner) -> int:
    """Peak bytes torch allocates for the largest step (weights included)."""
    sched, dev = runner.config.scheduler, runner.device
    lens = profile_lengths(sched.max_num_batched_tokens, runner.max_model_len)
    shape = kv_cache_shape(runner.arch, 1, runner.block_size, runner.tp)
    caches = [torch.zeros(shape, dtype=runner.dtype, device=dev)
              for _ in range(runner.arch.num_layers)]
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    hidden = runner.model(torch.zeros_like(positions), positions, caches,
                          _profile_meta(lens, runner.block_size, dev))
    rows = min(sched.max_num_seqs, hidden.shape[0])
    logits = runner.model.compute_logits(hidden[:rows])
    torch.log_softmax(logits, dim=-1)
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev)


def kv_budget_after_profiling(runner, utilization: float) -> int:
    """Bytes the KV pool may take on ``runner.device`` (see the module docstring)."""
    peak = profile_peak_bytes(runner)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(runner.device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(runner.device)
    return int(total * utilization - peak - max(outside_torch, 0) - GRAPH_RESERVE)
