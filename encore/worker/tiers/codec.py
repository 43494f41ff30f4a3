"""The lower tiers' KV codec (``cache.tier_kv_codec``): whole blocks as fixed-size bytes.

KVQuant's split, asymmetric min/max in ``bits`` (int8 or int4; ``qmax = 2**bits - 1``):

    keys    per channel: one (zero, scale) per (layer, head, dim), over the block's tokens
    values  per token:   one (zero, scale) per (layer, token, head), over head_dim
    x ≈ zero + q·scale,  q in [0, qmax],  |x - x̂| <= scale/2 ≈ (max - min) / (2·qmax)

Zero and scale are fp16 and rounded outward (zero down, scale up) before the codes are
computed, so [zero, zero + qmax·scale] still covers the range and the bound holds with the
stored parameters: the step grows by at most an fp16 ulp of the minimum over qmax, and the
decoded value is rounded to the model dtype. Values beyond fp16's
range (±65504) are clamped to it. One block's payload, layer by layer (a layer's bytes are
contiguous, so the host pool's layer groups concatenated are the bytes of a disk file):

    layer l: K codes [bs, heads, dim] │ V codes [bs, heads, dim] │ K zero, scale fp16
             [2, heads, dim] │ V zero, scale fp16 [2, bs, heads]
    int4: two codes a byte, the even element of head_dim in the low nibble

Every block carries its own parameters: nothing outside it is needed to decode it. Codec
``none`` is the block's own bytes (a view, no copy).

Our keys are quantized after RoPE (the device pool holds rotated keys); KVQuant quantizes
before it. RoPE turns each pair of channels by an angle that grows with the position, fast
for the high-frequency pairs: within a block such a channel swings between plus and minus its
pair's magnitude, so its range (and error) is wider than before rotation would be, and the
outlier channels that per-channel scales isolate are smeared over their pair. The slow
(low-frequency) pairs, where the large key channels usually live, barely turn within a block
and keep KVQuant's benefit. The bound above holds either way; decoded keys are rotated keys
of their block's positions, as the device pool holds them.

Pure torch: the same code encodes on the GPU (the tier copies' side stream) and on the CPU
(the worker's I/O threads).
"""

from __future__ import annotations

from typing import Any

import torch

TIER_CODECS = ("none", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}
_F16_MAX = 65504.0
_F16_TINY = 2.0**-24  # smallest positive fp16: a constant channel still gets a scale
_CHUNK_ELEMS = 1 << 24  # elements per pass: a pass's fp32 temporaries stay near 64 MB each


class KVCodec:
    """Encodes ``[n, layers, 2, bs, heads, dim]`` blocks (any float dtype, any device) into
    ``[n, layers, layer_bytes]`` uint8 and back into ``dtype``."""

    def __init__(self, name: str, layer_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if name not in TIER_CODECS:
            raise ValueError(f"tier_kv_codec={name!r} is not supported; choose one of "
                             f"{list(TIER_CODECS)}")
        two, bs, heads, dim = layer_shape
        if two != 2 or (name == "int4" and dim % 2):
            raise ValueError(f"cannot encode KV layers of shape {layer_shape} with {name}")
        self.name, self.dtype = name, dtype
        self.layer_shape = tuple(layer_shape)
        self.bits = _BITS.get(name, 0)
        self.qmax = (1 << self.bits) - 1
        per_kv = bs * heads * dim  # elements of K (or V) in one layer of a block
        if self.bits:
            codes = per_kv * self.bits // 8
            # K codes, V codes, K zero+scale, V zero+scale (fp16)
            self.sizes = [codes, codes, 2 * heads * dim * 2, 2 * bs * heads * 2]
        else:
            self.sizes = [2 * per_kv * torch.empty((), dtype=dtype).element_size()]
        self.layer_bytes = sum(self.sizes)

    def describe(self) -> dict[str, Any]:
        """What a payload's meaning depends on (enters the KV layout fingerprint)."""
        return {"codec": self.name, "bits": self.bits, "keys": "per-channel",
                "values": "per-token", "params": "float16", "layout": 1}

    # ------------------------------------------------------------------ encode
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[n, layers, 2, bs, heads, dim]`` -> ``[n, layers, layer_bytes]`` uint8 on
        x's device (codec none: a view of x's bytes when x is contiguous)."""
        n, layers = x.shape[:2]
        if not self.bits:
            return x.contiguous().view(torch.uint8).reshape(n, layers, self.layer_bytes)
        rows = x.reshape(n * layers, *self.layer_shape)
        out = torch.empty((n * layers, self.layer_bytes), dtype=torch.uint8, device=x.device)
        step = self._rows_per_pass()
        for a in range(0, rows.shape[0], step):
            torch.cat(self._encode_rows(rows[a:a + step]), dim=1, out=out[a:a + step])
        return out.view(n, layers, self.layer_bytes)

    def _encode_rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One pass over rows ``[r, 2, bs, heads, dim]``: the payload's four parts, each
        ``[r, bytes]``."""
        r = x.shape[0]
        k, v = x[:, 0], x[:, 1]  # in x's dtype: min and max are exact, codes promote
        kz, ks = _params(k.amin(1).float(), k.amax(1).float(), self.qmax)  # [r, heads, dim]
        vz, vs = _params(v.amin(-1).float(), v.amax(-1).float(), self.qmax)  # [r, bs, heads]
        kq = self._pack(_codes(k, kz[:, None], ks[:, None], self.qmax))
        vq = self._pack(_codes(v, vz[..., None], vs[..., None], self.qmax))
        kp = torch.stack([kz, ks], 1).view(torch.uint8)
        vp = torch.stack([vz, vs], 1).view(torch.uint8)
        return [t.reshape(r, -1) for t in (kq, vq, kp, vp)]

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q
        return q[..., 0::2] | (q[..., 1::2] << 4)

    # ------------------------------------------------------------------ decode
    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """``payload`` ``[n, layers, layer_bytes]`` uint8 -> ``[n, layers, 2, bs, heads,
        dim]`` in ``dtype``, on the payload's device."""
        n, layers = payload.shape[:2]
        if not self.bits:
            return payload.contiguous().view(self.dtype).view(n, layers, *self.layer_shape)
        rows = payload.reshape(n * layers, self.layer_bytes)
        out = torch.empty((n * layers, *self.layer_shape), dtype=self.dtype,
                          device=payload.device)
        step = self._rows_per_pass()
        for a in range(0, rows.shape[0], step):
            self._decode_rows(rows[a:a + step], out[a:a + step])
        return out.view(n, layers, *self.layer_shape)

    def _decode_rows(self, p: torch.Tensor, out: torch.Tensor) -> None:
        r = p.shape[0]
        _, bs, heads, dim = self.layer_shape
        kq, vq, kp, vp = torch.split(p, self.sizes, dim=1)
        kz, ks = kp.contiguous().view(torch.float16).view(r, 2, heads, dim).float().unbind(1)
        vz, vs = vp.contiguous().view(torch.float16).view(r, 2, bs, heads).float().unbind(1)
        k = self._unpack(kq).view(r, bs, heads, dim).float()
        v = self._unpack(vq).view(r, bs, heads, dim).float()
        out[:, 0].copy_(k.mul_(ks[:, None]).add_(kz[:, None]))
        out[:, 1].copy_(v.mul_(vs[..., None]).add_(vz[..., None]))

    def _unpack(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q
        return torch.stack([q & 0xF, q >> 4], dim=-1)

    def _rows_per_pass(self) -> int:
        per_row = 1
        for d in self.layer_shape:
            per_row *= d
        return max(1, _CHUNK_ELEMS // per_row)


def _params(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (zero, scale) whose grid ``zero + [0, qmax]·scale`` covers ``[lo, hi]``."""
    lo = lo.clamp(-_F16_MAX, _F16_MAX)
    hi = hi.clamp(-_F16_MAX, _F16_MAX)
    zero = lo.half()
    zero = torch.where(zero.float() > lo, zero.nextafter(torch.full_like(zero, -_F16_MAX)),
                       zero)
    scale = ((hi - zero.float()) / qmax).half().clamp_min(_F16_TINY)
    short = zero.float() + scale.float() * qmax < hi
    scale = torch.where(short, scale.nextafter(torch.full_like(scale, _F16_MAX)), scale)
    return zero, scale


def _codes(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return (x - zero.float()).div_(scale.float()).round_().clamp_(0, qmax).to(torch.uint8)
