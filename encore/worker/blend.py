"""Blending a prompt from cached chunks (CacheBlend), the worker side.

One sequence whose ``ScheduledSeq.blend`` plan covers its whole remaining prompt:

    1. copy   each chunk's standalone K/V (positions 0..L-1, in its chunk-store blocks) goes to
              the sequence's slots at [start, start + L), keys re-rotated by ``start`` (RoPE is
              a rotation: R(p + d) = R(d) R(p); V carries no position).
    2. layers 0 .. check_layer: every token of the remaining prompt is computed and attends
              over the whole context; the copied chunk K/V are overwritten with fresh values.
              At the check layer, before that write, each chunk token's deviation between the
              cached and the fresh K/V is scored; per chunk its ``recompute`` most deviating
              tokens are kept, with every token outside the chunks and the last token.
    3. later layers: only the kept tokens are computed; their fresh K/V overwrite the cached
              ones, the other chunk tokens keep their cached (re-rotated) K/V; a kept token
              attends to every position up to its own.

Returns the final hidden state of the last token and, per chunk, the mean relative K/V
deviation at the check layer (the chunk's measured context impact, for the adaptive policy).
Runs the plain-torch layer math on any device; attention is the model's backend (its prefill
over paged KV; for the kept rows with explicit query positions). The chunk K/V are copied only
into the layers from the check layer on (earlier layers are recomputed for every token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encore.kernels import reference
from encore.protocol.messages import BlendPlan, ScheduledSeq
from encore.worker.attention.base import AttentionMetadata
from encore.worker.blend_graphs import KeptRowGraphs
from encore.worker.models.llama import DecoderLayer, LlamaForCausalLM, rms_norm
from encore.worker.parallel import SINGLE, TPGroup


@torch.inference_mode()
def blend_forward(model: LlamaForCausalLM, kv_caches: list[torch.Tensor], seq: ScheduledSeq,
                  block_size: int, runtime: BlendRuntime | None = None
                  ) -> tuple[torch.Tensor, list[float]]:
    """Hidden state [1, d] of ``seq``'s last token, and each chunk's deviation (see above).
    With ``runtime.graphs`` (CUDA) the layers after the check layer replay a captured graph.
    A check layer < 0 is naive reuse (for comparisons): the chunks' K/V as stored in every
    layer, only the other rows computed, nothing measured."""
    runtime = runtime or BlendRuntime()
    plan = seq.blend
    assert plan is not None
    dev = model.embed_tokens.device
    start, n = seq.start_pos, len(seq.token_ids)
    table = torch.tensor(seq.block_table, dtype=torch.long, device=dev)
    pos = torch.arange(start, start + n, device=dev)
    slots = table[pos // block_size] * block_size + pos % block_size
    check = min(plan.check_layer, len(model.layers) - 1)
    copy = ChunkCopy(model, plan, slots, start, block_size, runtime.layers)
    stream = _Stream(model, model.embed(torch.tensor(seq.token_ids, device=dev)))
    deviations = torch.zeros(0)
    keep: torch.Tensor | None = None  # rows still computed, after the check layer
    meta = _metadata(start + n, table, slots)  # every row: an ordinary prefill
    if check < 0:
        keep = text_rows(plan, start, n, dev)
        stream.keep(keep)
        meta = _metadata(start + n, table, slots[keep], pos[keep])
    for i, (layer, cache) in enumerate(zip(model.layers, kv_caches, strict=True)):
        if keep is not None and _replay(runtime, stream, copy, kv_caches, i, keep, pos, slots,
                                        table, start + n):
            break
        q, k, v = stream.qkv(layer, pos if keep is None else pos[keep])
        selected = None
        if i >= check:  # the cached K/V: compared with the fresh ones, kept past the check
            copy(kv_caches, i, i + 1)
        if i == check:
            selected, deviations = select_tokens(k, v, cache, slots, plan, start, model.tp,
                                                 (layer.k_scale, layer.v_scale))
        out = layer.attn.forward(q, k, v, cache, meta, layer.scale, layer.k_scale,
                                 layer.v_scale)
        stream.finish(layer, out)
        if selected is not None:
            keep = selected
            stream.keep(keep)
            meta = _metadata(start + n, table, slots[keep], pos[keep])
    return stream.final(), deviations.tolist()


def _replay(runtime: BlendRuntime, stream: _Stream, copy: ChunkCopy,
            kv_caches: list[torch.Tensor], first: int, keep: torch.Tensor, pos: torch.Tensor,
            slots: torch.Tensor, table: torch.Tensor, total: int) -> bool:
    """Run layers ``first..`` for the kept rows as a CUDA graph replay, if one fits."""
    graphs = runtime.graphs
    if graphs is None or graphs.bucket(len(keep)) is None or stream.residual is None:
        return False
    copy(kv_caches, first, len(kv_caches))
    stream.x, stream.residual = graphs.run(first, stream.x, stream.residual, pos[keep],
                                           slots[keep], table, total)
    return True


class _Stream:
    """The residual stream of the rows being computed, through the model's layer math: the
    fused Triton ops when the model uses them (CUDA), else plain torch."""

    def __init__(self, model: LlamaForCausalLM, x: torch.Tensor) -> None:
        self.model, self.ops = model, model.ops
        self.x = x
        self.residual: torch.Tensor | None = None  # fused path: the stream before x is added

    def qkv(self, layer: DecoderLayer, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.ops is not None:
            h, self.residual = self.ops.add_rmsnorm(self.x, self.residual, layer.input_norm,
                                                    layer.eps)
            return layer.project_qkv_fused(h, positions, self.model.rope_inv_freq, self.ops)
        cos = self.model.rope_cos[positions].unsqueeze(1)
        sin = self.model.rope_sin[positions].unsqueeze(1)
        return layer.project_qkv(rms_norm(self.x, layer.input_norm, layer.eps), cos, sin)

    def finish(self, layer: DecoderLayer, attn_out: torch.Tensor) -> None:
        """o_proj, residual add and the MLP, after attention."""
        if self.ops is not None:
            x = layer.project_out_fused(attn_out, self.ops)
            h, self.residual = self.ops.add_rmsnorm(x, self.residual, layer.post_norm,
                                                    layer.eps)
            self.x = layer.mlp_fused(h, self.ops)
            return
        x = self.x + layer.project_out(attn_out)
        self.x = x + layer._mlp(rms_norm(x, layer.post_norm, layer.eps))

    def keep(self, rows: torch.Tensor) -> None:
        self.x = self.x[rows]
        if self.residual is not None:
            self.residual = self.residual[rows]

    def final(self) -> torch.Tensor:
        """The final-normed hidden state of the last row [1, d]."""
        eps = self.model.arch.rms_norm_eps
        if self.ops is not None:
            assert self.residual is not None
            return self.ops.add_rmsnorm(self.x[-1:], self.residual[-1:].clone(),
                                        self.model.norm, eps)[0]
        return rms_norm(self.x[-1:], self.model.norm, eps)


@dataclass
class BlendRuntime:
    """What a model runner keeps for blending on CUDA: the layers' cache addresses (one
    re-rotation launch for many layers) and the kept-row CUDA graphs (None: eager)."""

    layers: torch.Tensor | None = None
    graphs: KeptRowGraphs | None = None


class ChunkCopy:
    """Where each chunk token's K/V comes from and goes to, and by how many positions."""

    def __init__(self, model: LlamaForCausalLM, plan: BlendPlan, slots: torch.Tensor,
                 start: int, block_size: int, layers: torch.Tensor | None) -> None:
        src, dst, delta = [], [], []
        for c in plan.chunks:
            blocks = torch.tensor(c.src_blocks, dtype=torch.long)
            p = torch.arange(c.length)
            src.append(blocks[p // block_size] * block_size + p % block_size)
            dst.append(slots[c.start - start:c.start - start + c.length])
            delta.append(torch.full((c.length,), c.start, dtype=torch.long))
        dev = slots.device
        self.ops, self.inv_freq, self.layers = model.ops, model.rope_inv_freq, layers
        self.src, self.dst = torch.cat(src).to(dev), torch.cat(dst)
        self.deltas = torch.cat(delta).to(dev)

    def __call__(self, kv_caches: list[torch.Tensor], lo: int, hi: int) -> None:
        """Chunk K/V into the sequence's slots of layers [lo, hi), keys re-rotated by their
        delta: one Triton launch with the fused ops, else the kernel's torch twin."""
        caches = kv_caches[lo:hi]
        if self.ops is None:
            reference.rerotate_copy(caches, self.src, self.dst, self.deltas, self.inv_freq)
            return
        layers = None if self.layers is None else self.layers[lo:hi]
        self.ops.rerotate_copy(caches, self.src, self.dst, self.deltas, self.inv_freq, layers)


def text_rows(plan: BlendPlan, start: int, n: int, device: torch.device) -> torch.Tensor:
    """Rows outside every chunk, and the last row (sorted)."""
    return _text_mask(plan, start, n, device).nonzero().squeeze(1)


def _text_mask(plan: BlendPlan, start: int, n: int, device: torch.device) -> torch.Tensor:
    """[n] bool: the rows always computed (outside every chunk, and the last row)."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    for c in plan.chunks:
        keep[c.start - start:c.start - start + c.length] = False
    keep[-1] = True
    return keep


def select_tokens(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                  plan: BlendPlan, start: int, tp: TPGroup = SINGLE,
                  kv_scales: tuple[float, float] = (1.0, 1.0)
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to keep computing (sorted): non-chunk rows, the last row, and per chunk its
    ``recompute`` rows of largest K/V deviation (fresh ``k``/``v`` vs the cache at ``slots``,
    read before this layer overwrites it). Also each chunk's mean relative deviation. Under
    tensor parallelism the sums run over every rank's heads, so all ranks keep the same rows.
    An fp8 cache is compared at its values times ``kv_scales``."""
    flat = reference.as_raw(cache).view(2, -1, cache.shape[-2], cache.shape[-1])
    ck, cv = (reference.from_kv(flat[i].index_select(0, slots).view(cache.dtype), kv_scales[i])
              for i in (0, 1))
    kf, vf = k.float(), v.float()
    sums = torch.stack(((kf - ck).square().sum((1, 2)) + (vf - cv).square().sum((1, 2)),
                        kf.square().sum((1, 2)) + vf.square().sum((1, 2))))
    err, norm = tp.all_reduce(sums)
    rel = (err / norm.clamp_min(1e-12)).sqrt()
    keep = _text_mask(plan, start, len(slots), slots.device)
    means = []
    for c in plan.chunks:
        lo, hi = c.start - start, c.start - start + c.length
        means.append(rel[lo:hi].mean())
        if c.recompute:
            keep[lo + torch.topk(err[lo:hi], c.recompute).indices] = True
    return keep.nonzero().squeeze(1), torch.stack(means)


def _metadata(total: int, table: torch.Tensor, slots: torch.Tensor,
              positions: torch.Tensor | None = None) -> AttentionMetadata:
    """One sequence of ``total`` tokens whose rows are its last ``len(slots)`` tokens, or the
    rows at ``positions`` (the kept rows, ``AttentionMetadata.q_positions``)."""
    dev, m = table.device, len(slots)
    return AttentionMetadata(
        query_lens=[m], start_pos=[total - m],
        query_start_loc=torch.tensor([0, m], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([total], dtype=torch.int32, device=dev),
        block_tables=table[None].to(torch.int32), slot_mapping=slots,
        max_query_len=m, max_seq_len=total,
        q_positions=None if positions is None else positions.to(torch.int32))
