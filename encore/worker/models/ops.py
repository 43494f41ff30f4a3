"""The model's fusable ops on CUDA: residual-add + RMSNorm, RoPE (in place, or fused with the
KV write), SiLU x up, and the one-row (batch-1 decode) linear layers.

``select_ops`` decides once, at model construction, which path the decoder takes:

    CPU, or attention_backend=torch   ->  None: the plain-torch layer code in llama.py
                                          (exact vs transformers, tuned for a 2-core CPU)
    CUDA with the triton backend      ->  TritonOps: one kernel per fused op below

No fallback: on CUDA the Triton kernels run, or the model fails loudly at the first step.
The residual stream is carried between layers (vLLM style) so each add rides in a norm:

    h, r = add_rmsnorm(x, r, w)   # r += x (in place, rounded to r's dtype); h = norm(r) * w

One-row linears (batch-1 decode) go to whichever of cuBLAS and the Triton GEMV ran faster
for that weight shape, timed once at its first one-row call (the decode graphs' warm-up,
before capture): cuBLAS is fast on wide matrices but splits K, with an extra reduce kernel,
on narrow ones such as o_proj.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class TritonOps:
    """Fused Triton kernels (``kernels/``); every method works on CUDA or the interpreter."""

    name = "triton"

    def __init__(self) -> None:
        # Imported here, not at module load: TRITON_INTERPRET must be decided first.
        from encore.kernels.activation import silu_mul
        from encore.kernels.gemv import gemv
        from encore.kernels.rmsnorm import rmsnorm
        from encore.kernels.rope import rerotate_copy, rope_kv_write, rope_qk

        self._silu_mul, self._rmsnorm, self._rope_qk = silu_mul, rmsnorm, rope_qk
        self.rope_kv_write = rope_kv_write  # q rotated in place, k rotated into the cache
        self.rerotate_copy = rerotate_copy  # blending: chunk K/V to new slots and positions
        self._gemv = gemv
        self.gemv_choice: dict[tuple, bool] = {}  # (N, K, dtype, bias) -> Triton GEMV wins
        self.gemv_timings: dict[tuple, tuple[float, float]] = {}  # -> (gemv ms, cuBLAS ms)

    def add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual) * weight, the sum); the sum is written into ``residual``.
        Without a residual (the first layer) x itself becomes the residual stream."""
        if residual is None:
            return self._rmsnorm(x, weight, eps)[0], x
        return self._rmsnorm(x, weight, eps, residual)[0], residual

    def rope_qk(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
    ) -> None:
        """In place: rotate-half RoPE of q [T, H, D] and k [T, Hk, D] (views of qkv)."""
        self._rope_qk(q, k, positions, inv_freq)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F.linear; one contiguous row takes the faster of cuBLAS and the Triton GEMV."""
        if x.shape[0] != 1 or not x.is_contiguous():
            return F.linear(x, weight, bias)
        key = (*weight.shape, weight.dtype, bias is not None)
        use_gemv = self.gemv_choice.get(key)
        if use_gemv is None:
            use_gemv = self.gemv_choice[key] = self._time_gemv(x, weight, bias)
        return self._gemv(x, weight, bias) if use_gemv else F.linear(x, weight, bias)

    def _time_gemv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True when the GEMV beats cuBLAS on this shape (always True off CUDA: tests)."""
        if x.device.type != "cuda":
            return True
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"first one-row linear of weight {tuple(weight.shape)} inside CUDA graph "
                "capture: run a warm-up forward of the same batch size first"
            )
        from triton.testing import do_bench

        runs = {
            "gemv": lambda: self._gemv(x, weight, bias),
            "blas": lambda: F.linear(x, weight, bias),
        }
        ms = {name: [] for name in runs}
        for name in ("gemv", "blas", "gemv", "blas"):  # alternate: clocks ramp up at first
            ms[name].append(do_bench(runs[name], return_mode="median"))
        ms_gemv, ms_blas = min(ms["gemv"]), min(ms["blas"])
        self.gemv_timings[(*weight.shape, weight.dtype, bias is not None)] = (ms_gemv, ms_blas)
        logger.info(
            "one-row linear %s: triton gemv %.1f us, cublas %.1f us",
            tuple(weight.shape),
            1e3 * ms_gemv,
            1e3 * ms_blas,
        )
        return ms_gemv < ms_blas

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> silu(gate) * up [T, I]."""
        return self._silu_mul(gate_up)


def select_ops(device: torch.device, attn_name: str) -> TritonOps | None:
    """TritonOps on CUDA unless the torch attention backend (the all-torch reference path)
    was configured; None (plain torch) on the CPU."""
    if device.type != "cuda" or attn_name == "torch":
        return None
    return TritonOps()
