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
Runs the plain-torch layer math on any device. Attention over the contiguous rows goes through
the model's attention backend (its prefill); over the kept rows, through the backend's decode
kernel with each row as a one-token sequence (GPU), or SDPA with a position mask (torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scheduler.protocol import BlendPlan, ScheduledSeq
from worker.attention.base import AttentionMetadata
from worker.attention.torch_backend import gather_kv, write_kv
from worker.models.llama import LlamaForCausalLM, rms_norm


@torch.inference_mode()
def blend_forward(model: LlamaForCausalLM, kv_caches: list[torch.Tensor], seq: ScheduledSeq,
                  block_size: int) -> tuple[torch.Tensor, list[float]]:
    """Hidden state [1, d] of ``seq``'s last token, and each chunk's deviation (see above)."""
    plan = seq.blend
    assert plan is not None
    dev = model.embed_tokens.device
    start, n = seq.start_pos, len(seq.token_ids)
    total = start + n
    table = torch.tensor(seq.block_table, dtype=torch.long, device=dev)
    pos = torch.arange(start, total, device=dev)
    slots = table[pos // block_size] * block_size + pos % block_size
    copy_chunks(model, kv_caches, plan, slots, start, block_size)
    meta = _one_seq_metadata(start, n, table, slots)
    check = min(plan.check_layer, len(model.layers) - 1)
    x = F.embedding(torch.tensor(seq.token_ids, device=dev), model.embed_tokens)
    keep: torch.Tensor | None = None  # rows computed after the check layer
    rows_meta: AttentionMetadata | None = None
    deviations: list[float] = []
    for i, (layer, cache) in enumerate(zip(model.layers, kv_caches, strict=True)):
        p = pos if keep is None else pos[keep]
        cos, sin = model.rope_cos[p].unsqueeze(1), model.rope_sin[p].unsqueeze(1)
        q, k, v = layer.project_qkv(rms_norm(x, layer.input_norm, layer.eps), cos, sin)
        selected = None
        if i == check:
            selected, deviations = select_tokens(k, v, cache, slots, plan, start)
        if keep is None:  # contiguous rows: the backend's prefill (it writes K/V too)
            out = layer.attn.forward(q, k, v, cache, meta, layer.scale)
        elif rows_meta is not None:  # kept rows as one-token "sequences": paged decode kernel
            out = layer.attn.forward(q, k, v, cache, rows_meta, layer.scale)
        else:
            write_kv(cache, k, v, slots[keep])
            out = attend(q, cache, table, total, p, layer.scale)
        x = x + layer.project_out(out)
        x = x + layer._mlp(rms_norm(x, layer.post_norm, layer.eps))
        if selected is not None:
            keep = selected
            x = x[keep]
            if layer.attn.name != "torch":
                rows_meta = _rows_metadata(pos[keep], table, slots[keep])
    return rms_norm(x[-1:], model.norm, model.arch.rms_norm_eps), deviations


def copy_chunks(model: LlamaForCausalLM, kv_caches: list[torch.Tensor], plan: BlendPlan,
                slots: torch.Tensor, start: int, block_size: int) -> None:
    """Every layer: chunk K/V from the chunk blocks to the sequence's slots, keys re-rotated
    by the chunk's new start (angles in fp32 from the model's inverse frequencies)."""
    src, dst, delta = [], [], []
    for c in plan.chunks:
        blocks = torch.tensor(c.src_blocks, dtype=torch.long)
        p = torch.arange(c.length)
        src.append(blocks[p // block_size] * block_size + p % block_size)
        dst.append(slots[c.start - start:c.start - start + c.length])
        delta.append(torch.full((c.length,), c.start, dtype=torch.float32))
    dev = slots.device
    src_slots, dst_slots = torch.cat(src).to(dev), torch.cat(dst)
    angles = torch.cat(delta).to(dev)[:, None] * model.rope_inv_freq[None, :]
    cos = torch.cat((angles.cos(), angles.cos()), -1).unsqueeze(1)  # [M, 1, D]
    sin = torch.cat((-angles.sin(), angles.sin()), -1).unsqueeze(1)
    half = cos.shape[-1] // 2
    for cache in kv_caches:
        flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
        k = flat[0].index_select(0, src_slots).float()
        k = torch.addcmul(k * cos, k.roll(half, -1), sin)
        flat[0].index_copy_(0, dst_slots, k.to(cache.dtype))
        flat[1].index_copy_(0, dst_slots, flat[1].index_select(0, src_slots))


def select_tokens(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                  plan: BlendPlan, start: int) -> tuple[torch.Tensor, list[float]]:
    """Rows to keep computing (sorted): non-chunk rows, the last row, and per chunk its
    ``recompute`` rows of largest K/V deviation (fresh ``k``/``v`` vs the cache at ``slots``,
    read before this layer overwrites it). Also each chunk's mean relative deviation."""
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    ck, cv = flat[0].index_select(0, slots).float(), flat[1].index_select(0, slots).float()
    kf, vf = k.float(), v.float()
    err = (kf - ck).square().sum((1, 2)) + (vf - cv).square().sum((1, 2))
    rel = (err / (kf.square().sum((1, 2)) + vf.square().sum((1, 2))).clamp_min(1e-12)).sqrt()
    keep = torch.ones(len(slots), dtype=torch.bool, device=slots.device)
    means = []
    for c in plan.chunks:
        lo, hi = c.start - start, c.start - start + c.length
        keep[lo:hi] = False
        means.append(rel[lo:hi].mean())
        if c.recompute:
            keep[lo + torch.topk(err[lo:hi], c.recompute).indices] = True
    keep[-1] = True
    return keep.nonzero().squeeze(1), torch.stack(means).tolist()


def attend(q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, total: int,
           positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of rows at ``positions`` (q [m, H, D]) over the sequence's cached positions
    [0, total), each row seeing positions up to its own. -> [m, H, D]."""
    k, v = gather_kv(cache, table, total)  # [total, Hk, D]
    rep = q.shape[1] // k.shape[1]
    k = k.transpose(0, 1).to(q.dtype).repeat_interleave(rep, dim=0)  # [H, total, D]
    v = v.transpose(0, 1).to(q.dtype).repeat_interleave(rep, dim=0)
    mask = torch.arange(total, device=q.device)[None, :] <= positions[:, None]
    # 4-D inputs without enable_gqa: the form torch's fused CPU kernel takes (3-D or GQA
    # inputs fall back to the slow math path)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],
                                         attn_mask=mask, scale=scale)[0]
    return out.transpose(0, 1)


def _rows_metadata(positions: torch.Tensor, table: torch.Tensor,
                   slots: torch.Tensor) -> AttentionMetadata:
    """Each kept row as a one-token sequence at its position, sharing the block table: the
    backend's decode attention then gives every row its own causal extent (GPU backends; the
    torch backend would gather the context once per row, so it uses ``attend``)."""
    m = len(positions)
    seq_lens = (positions + 1).to(torch.int32)
    return AttentionMetadata(
        query_lens=[1] * m, start_pos=positions.tolist(),
        query_start_loc=torch.arange(m + 1, dtype=torch.int32, device=table.device),
        seq_lens=seq_lens, block_tables=table[None].expand(m, -1).to(torch.int32).contiguous(),
        slot_mapping=slots, max_query_len=1, max_seq_len=int(positions[-1]) + 1)


def _one_seq_metadata(start: int, n: int, table: torch.Tensor,
                      slots: torch.Tensor) -> AttentionMetadata:
    dev = table.device
    return AttentionMetadata(
        query_lens=[n], start_pos=[start],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([start + n], dtype=torch.int32, device=dev),
        block_tables=table[None].to(torch.int32), slot_mapping=slots,
        max_query_len=n, max_seq_len=start + n)
