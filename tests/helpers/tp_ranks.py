"""Ranks of a tensor-parallel group in plain processes (tests): each loads its shard of a
model directory and sends back (rank 0) the full logits of a few prefill and decode rows."""

from __future__ import annotations

import torch

from encore.configs.loading import build_config
from encore.protocol.messages import ScheduledSeq

BLOCK = 16


def prefill_and_decode_logits(runner, prompts: list[list[int]]) -> torch.Tensor:
    """Logits [rows, V] of every prompt row, then of one decode row per prompt (its
    argmax fed back), through the runner's paged KV cache."""
    seqs, tables, nxt = [], [], 0
    for i, p in enumerate(prompts):
        blocks = -(-(len(p) + 1) // BLOCK)
        tables.append(list(range(nxt, nxt + blocks)))
        nxt += blocks
        seqs.append(ScheduledSeq(f"s{i}", p, 0, tables[i], True))
    hidden, _ = runner._forward(seqs)
    first = runner.model.compute_logits(hidden)
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    tokens = first[ends].argmax(-1).tolist()
    decode = [ScheduledSeq(f"s{i}", [t], len(p), tables[i], True)
              for i, (p, t) in enumerate(zip(prompts, tokens, strict=True))]
    hidden, _ = runner._forward(decode)
    return torch.cat((first, runner.model.compute_logits(hidden)))


def model_runner(model_dir: str, tp=None, device: str = "cpu"):
    """fp32, eager (no CUDA graphs: the rows are read straight from the forward pass)."""
    from encore.worker.model_runner import ModelRunner
    from encore.worker.parallel import SINGLE

    config = build_config(overrides={"model": model_dir, "dtype": "float32", "device": device,
                                     "num_device_blocks": 64, "num_threads": 1,
                                     "enforce_eager": True})
    return ModelRunner(config, tp or SINGLE)


def rank_main(rank: int, size: int, init: str, model_dir: str, prompts: list[list[int]],
              results, device: str = "cpu") -> None:
    """One rank: join the group (gloo on the CPU, NCCL on CUDA), load its shard, compute;
    rank 0 puts the logits."""
    from encore.worker.parallel import close_group, init_group

    torch.set_num_threads(1)
    tp = init_group(rank, size, init, device)
    try:
        runner = model_runner(model_dir, tp, device)
        arch, layer = runner.arch, runner.model.layers[0]
        assert layer.o_proj.shape[1] * size == arch.q_size  # a shard, not the whole model
        assert layer.down_proj.shape[1] * size == arch.intermediate_size
        assert runner.model.embed_tokens.shape[0] == -(-arch.vocab_size // size)
        logits = prefill_and_decode_logits(runner, prompts)
        if rank == 0:
            results.put(logits.cpu().numpy())
    finally:
        close_group(tp)
