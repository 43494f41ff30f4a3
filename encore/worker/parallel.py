"""Tensor parallelism: this worker's rank in its group, and the collectives the model needs.

One worker process per rank (``tensor_parallel_size`` of them), one ``torch.distributed``
group: NCCL on CUDA (rank r on ``cuda:r``), gloo on the CPU. The engine sends every rank the
same step; each rank holds a Megatron-style shard of every weight and of every KV block:

    qkv_proj, gate_up_proj   column-parallel: this rank's heads / intermediate rows
    o_proj, down_proj        row-parallel: partial sums, then one all-reduce
    KV heads                 split over the ranks; replicated (each rank the KV head of its
                             query heads) when there are fewer KV heads than ranks
    embed_tokens, lm_head    vocab-parallel: rows [r * V/N, (r+1) * V/N) (V padded up to a
                             multiple of N); embedding = masked lookup + all-reduce,
                             logits = local rows + all-gather

``Shard`` is the arithmetic (which rows of a full weight this rank holds); ``TPGroup`` the
collectives, free no-ops at size 1 (the single-GPU path does not change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shard:
    """Which part of the model rank ``rank`` of ``size`` holds."""

    rank: int = 0
    size: int = 1

    def rows(self, total: int) -> tuple[int, int]:
        """This rank's even share ``[lo, hi)`` of ``total`` rows (``total % size == 0``)."""
        per = total // self.size
        return self.rank * per, (self.rank + 1) * per

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int, int]:
        """(local query heads, local KV heads, index of this rank's first KV head)."""
        nh = num_heads // self.size
        if num_kv_heads >= self.size:
            nkv = num_kv_heads // self.size
            return nh, nkv, self.rank * nkv
        return nh, 1, self.rank * num_kv_heads // self.size  # replicated: my queries' group

    def vocab_rows(self, vocab: int) -> tuple[int, int]:
        """Rows of the (padded) vocabulary this rank holds; the last rank's may pass ``vocab``
        (padding rows, zero)."""
        per = -(-vocab // self.size)
        return self.rank * per, (self.rank + 1) * per


def check_divisible(arch: Any, size: int) -> None:
    """ValueError naming the first dimension a group of ``size`` ranks cannot split."""
    if size == 1:
        return
    problems = []
    if arch.num_heads % size:
        problems.append(f"num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads >= size and arch.num_kv_heads % size:
        problems.append(f"num_key_value_heads={arch.num_kv_heads}")
    if arch.num_kv_heads < size and size % arch.num_kv_heads:
        problems.append(f"num_key_value_heads={arch.num_kv_heads} (fewer than the ranks, and "
                        "the ranks are not a multiple of it)")
    if arch.intermediate_size % size:
        problems.append(f"intermediate_size={arch.intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not divide "
                         f"{', '.join(problems)}")


class TPGroup:
    """This worker's rank and the collectives over its group (no-ops for a group of one)."""

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None,
                 backend: str = "") -> None:
        self.shard = Shard(rank, size)
        self.rank, self.size = rank, size
        self.group, self.backend = group, backend

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] from every rank -> [..., size * n], rank order along the last dim."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        if self.backend == "nccl":
            dist.all_gather_into_tensor(out, x, group=self.group)
        else:
            dist.all_gather(list(out.unbind(0)), x, group=self.group)
        return out.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place; returns ``x``."""
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(x, src=0, group=self.group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (the KV pool is sized by the tightest rank)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) \
            if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE = TPGroup()


def init_group(rank: int, size: int, init_method: str, device: str) -> TPGroup:
    """Join the group of ``size`` ranks at ``init_method`` (a ``file://`` rendezvous in the
    executor's private directory); NCCL when ``device`` is CUDA, else gloo."""
    if size == 1:
        return SINGLE
    import torch.distributed as dist

    backend = "gloo"
    if device != "cpu" and torch.cuda.is_available():
        if torch.cuda.device_count() < size:
            raise RuntimeError(f"tensor_parallel_size={size} needs {size} GPUs; this host "
                               f"has {torch.cuda.device_count()}")
        torch.cuda.set_device(rank)
        backend = "nccl"
    kw: dict[str, Any] = {}
    if backend == "nccl":
        kw["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, **kw)
    return TPGroup(rank, size, dist.group.WORLD, backend)


def close_group(tp: TPGroup) -> None:
    if tp.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
