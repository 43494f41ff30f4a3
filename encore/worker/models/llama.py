"""The Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3) in plain torch.

One flat batch of T tokens, no batch dimension; attention over the paged KV cache is the
backend's job. Read top to bottom:

    input_ids [T] -> embed -> N x DecoderLayer -> final norm -> hidden [T, d]
    DecoderLayer:  x += o_proj(attn(rope(qkv(norm(x)))))  ;  x += down(silu(gate) * up)(norm(x))

On CUDA (triton attention) the layers take a fused path instead (``worker/models/ops.py``):
the residual stream is carried between layers so each add rides in a Triton RMSNorm, one
kernel rotates q in place inside the qkv output and writes the rotated k and v into the
cache, and SiLU x up is one kernel:

    h, r = add_norm(x, r) -> qkv -> rope_kv_write (q in place; k, v to cache) -> attend
         -> o_proj = x
    h, r = add_norm(x, r) -> gate_up -> silu_mul -> down = x        ... final: add_norm(x, r)

One row (batch-1 decode, single device) folds the norms, SiLU x up and the residual adds into
the GEMVs (``kernels/gemv.py``): qkv+norm -> rope_kv_write -> attend -> o_proj+add ->
gate_up+norm+SiLU -> down+add, three launches fewer per layer.

Speed on a 2-core CPU comes from a few choices: q/k/v is one matmul and gate/up is one
matmul; the RoPE cos/sin table is built once (in the model dtype, as HF casts it) and indexed
by position once per forward; q and k are rotated together in one pass; RMSNorm is one
``layer_norm`` kernel (see ``rms_norm``).

Weights are loaded by :meth:`LlamaForCausalLM.load_weight` under Hugging Face names
(``model.layers.3.self_attn.q_proj.weight``), which copies each tensor into its slice of the
fused parameter; the GGUF loader renames to HF names first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from encore.worker.attention.base import AttentionBackend, AttentionMetadata
from encore.worker.models.arch import ModelArch, rope_type
from encore.worker.models.ops import TritonOps, select_ops
from encore.worker.models.quant import PackedLinear
from encore.worker.parallel import SINGLE, TPGroup


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, accumulated in float32 for bf16/fp16 input (like HF's
    explicit upcast), the weight applied before rounding (one rounding fewer than HF).

    On the CPU, torch's ``rms_norm`` runs as about ten small kernels, while ``layer_norm`` is
    one: RMSNorm(x) is LayerNorm([x, -x]) without bias (the mean of [x, -x] is 0 and its
    variance is mean(x^2)), with the weight repeated. Same values (bf16: 3 of 532k elements
    differ by one ulp), 8 vs 13.5 us per batch-1 call (2-core EPYC). The result is a view
    of the first half; ``PackedLinear.matmul`` makes it contiguous where a kernel needs it.
    """
    if x.device.type != "cpu":
        return F.rms_norm(x, weight.shape, weight, eps)
    d = x.shape[-1]
    return F.layer_norm(torch.cat((x, x.neg()), -1), (2 * d,), _doubled(weight), None,
                        eps)[..., :d]


_DOUBLED = WeakIdKeyDictionary()  # norm weight -> (its version, [weight, weight])


def _doubled(weight: torch.Tensor) -> torch.Tensor:
    """[weight, weight], cached per norm weight and rebuilt when the weight changes
    (loading copies into it in place, which bumps its version)."""
    hit = _DOUBLED.get(weight)
    if hit is None or hit[0] != weight._version:
        hit = (weight._version, torch.cat((weight.detach(), weight.detach())))
        _DOUBLED[weight] = hit
    return hit[1]


def linear(x: torch.Tensor, weight: torch.Tensor | PackedLinear,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except one bf16 row on the CPU goes through ``torch.mv``: batch-1 decode is
    memory-bound and oneDNN's bf16 GEMM reaches about half the bandwidth mv does for M=1
    (measured 2x on the lm_head, 1.3-1.7x on the layer matmuls, on a 2-core Xeon)."""
    if not isinstance(weight, torch.Tensor):  # a quantized matrix (models/quant.py)
        y = weight.matmul(x)
        return y if bias is None else y + bias
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        y = torch.mv(weight, x[0]).unsqueeze(0)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, computed exactly as HF does (incl. llama3)."""
    dim, base = arch.head_dim, arch.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope_type(arch.rope_scaling) == "llama3":
        inv = llama3_scale(inv, arch.rope_scaling or {})
    return inv


def llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """HF ``_compute_llama3_parameters``: slow the low frequencies by ``factor``, keep the high
    ones, interpolate smoothly between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * torch.pi / inv_freq
    inv = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv)


def rope_cache(
    arch: ModelArch, max_positions: int, device: torch.device | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables [max_positions, head_dim] (float32 math, stored in ``dtype``).

    cos = [cos f, cos f], sin = [-sin f, sin f], so that rotate-half RoPE is one roll and one
    multiply-add (see ``apply_rope``).
    """
    inv = rope_inv_freq(arch).to(device)
    pos = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF/NeoX layout): x*cos + rotate_half(x)*sin, where
    rotate_half(x) = [-x2, x1] = roll(x, D/2) * sign, the sign living in ``sin``.
    x [T, H, D]; cos, sin [T, 1, D] from ``rope_cache``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def kv_cache_shape(arch: ModelArch, num_blocks: int, block_size: int,
                   tp: TPGroup = SINGLE) -> tuple[int, ...]:
    """Shape of one layer's paged KV cache on one rank:
    [2, num_blocks, block_size, local kv heads, head_dim]."""
    kv_heads = tp.shard.heads(arch.num_heads, arch.num_kv_heads)[1]
    return (2, num_blocks, block_size, kv_heads, arch.head_dim)


def kv_bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype,
                       tp: TPGroup = SINGLE) -> int:
    """Bytes one block takes across all layers (K and V) on one rank."""
    kv_heads = tp.shard.heads(arch.num_heads, arch.num_kv_heads)[1]
    per_layer = 2 * block_size * kv_heads * arch.head_dim * dtype.itemsize
    return per_layer * arch.num_layers


def _empty(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP, with fused qkv and gate_up projections. Under tensor
    parallelism (``tp``) the layer holds its rank's heads and intermediate rows; o_proj and
    down_proj are followed by an all-reduce (``worker/parallel.py``)."""

    def __init__(self, arch: ModelArch, attn: AttentionBackend, index: int,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        nh, nkv, _ = tp.shard.heads(arch.num_heads, arch.num_kv_heads)
        d, dh, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size // tp.size
        qkv = (nh + 2 * nkv) * dh
        self.index, self.attn, self.eps = index, attn, arch.rms_norm_eps
        self.num_heads = nh
        self.num_kv_heads = nkv
        self.head_dim = dh
        self.scale = dh**-0.5
        self.k_scale = self.v_scale = 1.0  # an fp8 KV cache's per-tensor scales (loaders)
        self.input_norm = _empty(d)
        self.qkv_proj = _empty(qkv, d)
        self.qkv_bias = _empty(qkv) if arch.attention_bias else None
        self.q_norm = _empty(dh) if arch.qk_norm else None
        self.k_norm = _empty(dh) if arch.qk_norm else None
        self.o_proj = _empty(d, nh * dh)
        self.post_norm = _empty(d)
        self.gate_up_proj = _empty(2 * inter, d)
        self.down_proj = _empty(d, inter)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self._attention(rms_norm(x, self.input_norm, self.eps), cos, sin, kv_cache, meta)
        return x + self._mlp(rms_norm(x, self.post_norm, self.eps))

    def _attention(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(h, cos, sin)
        out = self.attn.forward(q, k, v, kv_cache, meta, self.scale, self.k_scale, self.v_scale)
        return self.project_out(out)

    def project_qkv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, Hk, D] of the normed input ``h``, q and k rotated.
        They are views of one qkv tensor (last dim contiguous)."""
        t, nh, nkv = h.shape[0], self.num_heads, self.num_kv_heads
        qkv = linear(h, self.qkv_proj, self.qkv_bias).view(t, nh + 2 * nkv, self.head_dim)
        qk, v = self._qk_v(qkv)
        qk = apply_rope(qk, cos, sin)  # q and k share positions: rotate them in one pass
        return qk[:, :nh], qk[:, nh:], v

    def project_out(self, attn_out: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [T, H, D] -> [T, d] (summed over the ranks)."""
        return self.tp.all_reduce(linear(attn_out.reshape(attn_out.shape[0], -1), self.o_proj))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = linear(h, self.gate_up_proj).chunk(2, dim=-1)
        return self.tp.all_reduce(linear(F.silu(gate) * up, self.down_proj))

    # ---- fused path (CUDA, TritonOps) ----------------------------------------------------

    def forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        ops: TritonOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (the embedding, residual None, at layer 0);
        returns (this layer's output, the residual stream before it). Mutates residual."""
        h, residual = ops.add_rmsnorm(x, residual, self.input_norm, self.eps)
        x = self._attention_fused(h, positions, inv_freq, kv_cache, meta, ops)
        h, residual = ops.add_rmsnorm(x, residual, self.post_norm, self.eps)
        return self.mlp_fused(h, ops), residual

    def _attention_fused(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        ops: TritonOps,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv_fused(h, positions, inv_freq, ops, rotate=False)
        out = self._rope_write_attend(q, k, v, positions, inv_freq, kv_cache, meta, ops)
        return self.project_out_fused(out, ops)

    def _rope_write_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        ops: TritonOps,
    ) -> torch.Tensor:
        """q rotated in place, k rotated and v written into the cache, then attention."""
        ops.rope_kv_write(q, k, v, positions, inv_freq, kv_cache, meta.slot_mapping,
                          self.k_scale, self.v_scale, pdl=True)  # positions: set per step
        return self.attn.attend(q, kv_cache, meta, self.scale, self.k_scale, self.v_scale)

    def project_out_fused(self, attn_out: torch.Tensor, ops: TritonOps) -> torch.Tensor:
        """``project_out`` on the fused kernels."""
        out = ops.linear(attn_out.reshape(attn_out.shape[0], -1), self.o_proj)
        return self.tp.all_reduce(out)

    def project_qkv_fused(
        self, h: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, ops: TritonOps,
        rotate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``project_qkv`` on the fused kernels: RoPE in place, angles in fp32 (``rotate``
        False: q and k as projected, for ``rope_kv_write``)."""
        t, nh, nkv = h.shape[0], self.num_heads, self.num_kv_heads
        qkv = ops.linear(h, self.qkv_proj, self.qkv_bias).view(t, nh + 2 * nkv, self.head_dim)
        q, k, v = self._split_qkv(qkv)
        if rotate:
            ops.rope_qk(q, k, positions, inv_freq)  # in place, angles in fp32 from inv_freq
        return q, k, v

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v views of qkv [T, H + 2 Hk, D] (Qwen3: q and k normed, a new tensor)."""
        qk, v = self._qk_v(qkv)
        return qk[:, : self.num_heads], qk[:, self.num_heads :], v

    def _qk_v(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k together [T, H + Hk, D], and v [T, Hk, D], of qkv: views, except that
        Qwen3's per-head norms before RoPE (torch ops) make qk a new tensor."""
        nh, nkv = self.num_heads, self.num_kv_heads
        qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv :]
        if self.q_norm is not None:
            qk = torch.cat(
                (
                    rms_norm(qk[:, :nh], self.q_norm, self.eps),
                    rms_norm(qk[:, nh:], self.k_norm, self.eps),
                ),
                dim=1,
            )
        return qk, v

    def forward_one_row(
        self,
        residual: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        ops: TritonOps,
    ) -> None:
        """One decode row [1, d] on the folded GEMVs: the norms ride in the qkv and gate_up
        GEMVs, SiLU x up in gate_up's, and o_proj and down_proj add into ``residual`` (the
        stream, summed; updated in place). Single device only (the adds precede any
        all-reduce)."""
        t, nh, nkv = 1, self.num_heads, self.num_kv_heads
        qkv = ops.norm_linear(residual, self.input_norm, self.eps, self.qkv_proj,
                              self.qkv_bias).view(t, nh + 2 * nkv, self.head_dim)
        q, k, v = self._split_qkv(qkv)
        out = self._rope_write_attend(q, k, v, positions, inv_freq, kv_cache, meta, ops)
        ops.linear_add(out.reshape(t, -1), self.o_proj, residual)
        act = ops.norm_linear(residual, self.post_norm, self.eps, self.gate_up_proj, swiglu=True)
        ops.linear_add(act, self.down_proj, residual)

    def mlp_fused(self, h: torch.Tensor, ops: TritonOps) -> torch.Tensor:
        out = ops.linear(ops.silu_mul(ops.linear(h, self.gate_up_proj)), self.down_proj)
        return self.tp.all_reduce(out)


def _wait_layer(meta: AttentionMetadata, i: int) -> None:
    """Layer ``i`` reads KV that host-tier loads are still copying: wait for them."""
    if meta.layer_ready is not None:
        meta.layer_ready.wait(i)


class LlamaForCausalLM(nn.Module):
    """Decoder over a flat token batch; ``forward`` returns final-normed hidden states."""

    waits_per_layer = True  # honours ``AttentionMetadata.layer_ready``

    def __init__(
        self,
        arch: ModelArch,
        attn: AttentionBackend,
        *,
        max_positions: int | None = None,
        ops: TritonOps | None | str = "auto",
        tp: TPGroup = SINGLE,
    ) -> None:
        """Parameters are allocated uninitialised on torch's current default device and dtype
        (the loaders wrap this in ``torch.device(...)`` / default dtype); RoPE tables cover
        ``max_positions`` (default: the model's max_position_embeddings). ``ops``: "auto"
        picks by device and backend (``select_ops``); None forces the plain-torch layers.
        ``tp``: this rank's group; the parameters are its shards (``worker/parallel.py``)."""
        super().__init__()
        self.arch, self.attn, self.tp = arch, attn, tp
        lo, hi = tp.shard.vocab_rows(arch.vocab_size)
        self.vocab_lo, self.vocab_rows = lo, hi - lo
        self.embed_tokens = _empty(hi - lo, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, attn, i, tp)
                                    for i in range(arch.num_layers))
        self.norm = _empty(arch.hidden_size)
        self.lm_head = (
            self.embed_tokens
            if arch.tie_word_embeddings
            else _empty(hi - lo, arch.hidden_size)
        )
        if tp.size > 1:  # padding rows of the last rank's vocabulary shard stay zero
            with torch.no_grad():
                self.embed_tokens.zero_()
                self.lm_head.zero_()
        positions = max_positions or arch.max_position_embeddings
        cos, sin = rope_cache(arch, positions, self.embed_tokens.device, self.embed_tokens.dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        inv_freq = rope_inv_freq(arch).to(self.embed_tokens.device, torch.float32)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.ops = select_ops(self.embed_tokens.device, attn.name) if ops == "auto" else ops

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: one per layer (mutated); -> hidden [T, d]."""
        if isinstance(self.ops, TritonOps):
            return self._forward_fused(input_ids, positions, kv_caches, meta, self.ops)
        x = self.embed(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1)  # [T, 1, D], shared by all layers
        sin = self.rope_sin[positions].unsqueeze(1)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            _wait_layer(meta, i)
            x = layer(x, cos, sin, kv_cache, meta)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps)

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        ops: TritonOps,
    ) -> torch.Tensor:
        """The same function on the fused kernels (positions must be contiguous); one row on
        a single device takes the folded GEMVs (``DecoderLayer.forward_one_row``)."""
        if input_ids.shape[0] == 1 and self.tp.size == 1:
            residual = self.embed(input_ids)  # a new tensor: the stream is summed into it
            for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
                _wait_layer(meta, i)
                layer.forward_one_row(residual, positions, self.rope_inv_freq, kv_cache, meta,
                                      ops)
            return ops.final_norm(residual, self.norm, self.arch.rms_norm_eps)
        x, residual = self.embed(input_ids), None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            _wait_layer(meta, i)
            x, residual = layer.forward_fused(
                x, residual, positions, self.rope_inv_freq, kv_cache, meta, ops
            )
        return ops.add_rmsnorm(x, residual, self.norm, self.arch.rms_norm_eps)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, d]; vocab-parallel under TP: each rank looks up the ids in its
        rows (zero elsewhere) and the ranks' rows are summed."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        local = input_ids - self.vocab_lo
        outside = (local < 0) | (local >= self.vocab_rows)
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, d] -> logits [N, vocab] in float32 (written into ``out`` if given).
        Under TP every rank computes its vocabulary rows and gets everyone's (all-gather)."""
        if (isinstance(self.ops, TritonOps) and hidden.shape[0] == 1 and self.tp.size == 1
                and isinstance(self.lm_head, torch.Tensor)):  # batch-1 decode: logits in fp32
            return self.ops.linear(hidden, self.lm_head, out=out, out_dtype=torch.float32)
        logits = linear(hidden, self.lm_head)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last(logits)[:, :self.arch.vocab_size]
        return logits.float() if out is None else out.copy_(logits)

    # ---- weight loading (HF names) -------------------------------------------------------

    @torch.no_grad()
    def load_weight(self, name: str, source: Any) -> None:
        """Copy this rank's part of one HF-named tensor into its (slice of a fused) parameter;
        casts dtype/device. ``source``: a tensor, or anything sliceable like one with a
        ``get_shape()`` (a safetensors slice: only this rank's rows are read)."""
        m = _KV_SCALE.fullmatch(name)
        if m is not None:  # an fp8 KV cache's per-tensor scale (llm-compressor's names)
            layer = self.layers[int(m[1])]
            value = float(torch.as_tensor(source).float().max())
            if m[2] in ("k", "kv"):
                layer.k_scale = value
            if m[2] in ("v", "kv"):
                layer.v_scale = value
            return
        part = self._destination(name)
        shape = tuple(source.shape) if hasattr(source, "shape") else tuple(source.get_shape())
        if shape != part.full_shape:
            raise ValueError(
                f"weight {name!r} has shape {shape}, expected {part.full_shape}"
            )
        part.dest.copy_(part.take(source))

    def _destination(self, name: str) -> Part:
        arch, tp = self.arch, self.tp
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            dest = self.embed_tokens if name.startswith("model.") else self.lm_head
            hi = min(self.vocab_lo + self.vocab_rows, arch.vocab_size)
            return Part(dest[:hi - self.vocab_lo], 0, self.vocab_lo, hi,
                        (arch.vocab_size, arch.hidden_size))
        if name == "model.norm.weight":
            return Part.whole(self.norm)
        m = re.fullmatch(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)", name)
        if m is None or int(m[1]) >= len(self.layers):
            raise KeyError(f"unexpected weight {name!r}")
        return _layer_part(self.layers[int(m[1])], arch, tp, m[2], m[3], name)


_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k|v|kv)_scale")


@dataclass(frozen=True)
class Part:
    """Where one checkpoint tensor goes on this rank: rows (``dim`` 0) or columns (``dim`` 1)
    ``[lo, hi)`` of the full tensor (of shape ``full_shape``) are copied into ``dest``."""

    dest: torch.Tensor
    dim: int
    lo: int
    hi: int
    full_shape: tuple[int, ...]

    @classmethod
    def whole(cls, dest: torch.Tensor) -> Part:
        return cls(dest, 0, 0, dest.shape[0], tuple(dest.shape))

    def take(self, source: Any) -> torch.Tensor:
        """The rows/columns of ``source`` this rank keeps (a tensor; reads only those)."""
        if self.lo == 0 and self.hi == self.full_shape[self.dim]:
            piece = source if isinstance(source, torch.Tensor) else source[:]
        elif self.dim == 0:
            piece = source[self.lo:self.hi]
        else:
            piece = source[:, self.lo:self.hi]
        return piece


def _layer_part(layer: DecoderLayer, arch: ModelArch, tp: TPGroup, part: str, kind: str,
                name: str) -> Part:
    """Where HF weight ``part.kind`` of a layer goes: this rank's rows of q/k/v (in the fused
    qkv), gate/up (in the fused gate_up), its columns of o_proj/down_proj, or a whole norm."""
    d, dh = arch.hidden_size, arch.head_dim
    nh, nkv, kv0 = tp.shard.heads(arch.num_heads, arch.num_kv_heads)
    inter_lo, inter_hi = tp.shard.rows(arch.intermediate_size)
    q0 = tp.rank * nh
    qkv_rows = {  # source rows [lo, hi) of the full projection -> local rows from ``at``
        "q_proj": (q0 * dh, (q0 + nh) * dh, 0, arch.q_size),
        "k_proj": (kv0 * dh, (kv0 + nkv) * dh, nh * dh, arch.kv_size),
        "v_proj": (kv0 * dh, (kv0 + nkv) * dh, (nh + nkv) * dh, arch.kv_size),
    }
    if part.startswith("self_attn.") and part[10:] in qkv_rows:
        lo, hi, at, full = qkv_rows[part[10:]]
        target = layer.qkv_proj if kind == "weight" else layer.qkv_bias
        if target is not None:
            shape = (full, d) if kind == "weight" else (full,)
            return Part(target[at:at + hi - lo], 0, lo, hi, shape)
    elif part in ("mlp.gate_proj", "mlp.up_proj") and kind == "weight":
        n = inter_hi - inter_lo
        dest = layer.gate_up_proj[:n] if part == "mlp.gate_proj" else layer.gate_up_proj[n:]
        return Part(dest, 0, inter_lo, inter_hi, (arch.intermediate_size, d))
    elif part == "self_attn.o_proj" and kind == "weight":
        return Part(layer.o_proj, 1, q0 * dh, (q0 + nh) * dh, (d, arch.q_size))
    elif part == "mlp.down_proj" and kind == "weight":
        return Part(layer.down_proj, 1, inter_lo, inter_hi, (d, arch.intermediate_size))
    elif kind == "weight":
        simple = {
            "input_layernorm": layer.input_norm,
            "post_attention_layernorm": layer.post_norm,
            "self_attn.q_norm": layer.q_norm,
            "self_attn.k_norm": layer.k_norm,
        }
        if simple.get(part) is not None:
            return Part.whole(simple[part])
    raise KeyError(f"unexpected weight {name!r} for {arch.architecture}")


def expected_weight_names(arch: ModelArch) -> list[str]:
    """Every HF weight name a checkpoint of ``arch`` must provide."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        names += [
            p + s + ".weight"
            for s in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
                "input_layernorm",
                "post_attention_layernorm",
            )
        ]
        if arch.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if arch.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names
