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
for that weight shape, timed once per process and device at its first one-row call (the
decode graphs' warm-up, before capture; a second engine in the process reuses the choice, so
two engines never run different kernels because their timings fell either side of noise).
cuBLAS is fast on wide matrices but splits K, with an extra reduce kernel, on narrow ones
such as o_proj. The one-row folds (``norm_linear``: RMSNorm, and SiLU x up,
inside the GEMV; ``linear_add``: the residual add in its epilogue) are chosen the same way,
each against its separate kernels.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# The one-row choices, shared by every TritonOps of the process:
# (device, N, K, dtype, bias[, variant]) -> the first-named kernel of the timing won.
GEMV_CHOICE: dict[tuple, bool] = {}
GEMV_TIMINGS: dict[tuple, tuple[float, float]] = {}  # -> (its ms, the other's ms)


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
        self.gemv_choice, self.gemv_timings = GEMV_CHOICE, GEMV_TIMINGS  # process-wide

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
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """F.linear; one contiguous row takes the faster of cuBLAS and the Triton GEMV.
        ``out_dtype`` (float32: the logits) converts the result, which the GEMV does as it
        stores it; ``out`` receives it if given."""
        dtype = out_dtype or x.dtype

        def blas() -> torch.Tensor:
            y = F.linear(x, weight, bias)
            if out is not None:
                return out.copy_(y)
            return y if y.dtype == dtype else y.to(dtype)

        def gemv() -> torch.Tensor:
            dest = out if out is not None else torch.empty(1, weight.shape[0], dtype=dtype,
                                                            device=x.device)
            return self._gemv(x, weight, bias, out=dest, pdl=True)

        if x.shape[0] != 1 or not x.is_contiguous():
            return blas()
        key = (weight.device, *weight.shape, weight.dtype, bias is not None) + (
            (dtype,) if dtype != x.dtype else ())
        use_gemv = self.gemv_choice.get(key)
        if use_gemv is None:
            use_gemv = self.gemv_choice[key] = self._faster(
                x.device, key, ("triton gemv", gemv), ("cublas", blas))
        return gemv() if use_gemv else blas()

    # ---- one-row folds (batch-1 decode; kernels/gemv.py) -------------------------------

    def norm_linear(
        self, r: torch.Tensor, norm_w: torch.Tensor, eps: float, weight: torch.Tensor,
        bias: torch.Tensor | None = None, swiglu: bool = False,
    ) -> torch.Tensor:
        """linear(RMSNorm(r) * norm_w, weight) of the one row r [1, K] (the residual stream,
        already summed), then silu(gate) * up if ``swiglu``: one GEMV when folding wins."""
        def split() -> torch.Tensor:
            y = self.linear(self._rmsnorm(r, norm_w, eps)[0], weight, bias)
            return self._silu_mul(y) if swiglu else y

        def fold() -> torch.Tensor:
            return self._gemv(r, weight, bias, norm_weight=norm_w, eps=eps, swiglu=swiglu,
                              pdl=True)

        key = (weight.device, *weight.shape, weight.dtype, bias is not None,
               "norm+swiglu" if swiglu else "norm")
        return fold() if self._fold_wins(r.device, key, fold, split) else split()

    def linear_add(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> None:
        """residual [1, N] += linear(x, weight) (rounded, then the sum rounded, as
        ``add_rmsnorm`` adds): one GEMV when folding wins."""
        def split(r: torch.Tensor = residual) -> None:
            r.add_(self.linear(x, weight))

        def fold(r: torch.Tensor = residual) -> None:
            self._gemv(x, weight, residual=r, pdl=True)

        key = (weight.device, *weight.shape, weight.dtype, False, "residual")
        wins = self.gemv_choice.get(key)
        if wins is None:  # timed on a copy: the timing runs must not touch the real stream
            scratch = residual.clone()
            wins = self._fold_wins(x.device, key, lambda: fold(scratch), lambda: split(scratch))
        (fold if wins else split)()

    def final_norm(self, r: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm(r) * norm_w of a residual stream that is already summed."""
        return self._rmsnorm(r, norm_w, eps)[0]

    def _fold_wins(self, device: torch.device, key: tuple, fold, split) -> bool:
        """Whether the folded GEMV beats the separate kernels for ``key``, timed once (outside
        graph capture, like ``linear``'s choice); always on the interpreter (tests)."""
        wins = self.gemv_choice.get(key)
        if wins is None:
            split()  # settles the separate path's own choices (``linear``) before the timing
            wins = self.gemv_choice[key] = self._faster(
                device, key, ("folded", fold), ("separate", split))
        return wins

    def _faster(self, device: torch.device, key: tuple, first: tuple, second: tuple) -> bool:
        """True when ``first`` = (name, fn) runs faster than ``second`` on CUDA (always True
        off CUDA: tests). Timed with L2 flushed, alternating (clocks ramp up at first);
        recorded in ``gemv_timings[key]`` as (first ms, second ms)."""
        if device.type != "cuda":
            return True
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"first one-row call of {key} inside CUDA graph capture: run a warm-up "
                "forward of the same batch size first"
            )
        from triton.testing import do_bench

        ms: dict[str, list[float]] = {first[0]: [], second[0]: []}
        for name, fn in (first, second, first, second):
            ms[name].append(do_bench(fn, return_mode="median"))
        a, b = min(ms[first[0]]), min(ms[second[0]])
        self.gemv_timings[key] = (a, b)
        logger.info("one-row %s: %s %.1f us, %s %.1f us", key, first[0], 1e3 * a, second[0],
                    1e3 * b)
        return a < b

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> silu(gate) * up [T, I]."""
        return self._silu_mul(gate_up)


def select_ops(device: torch.device, attn_name: str) -> TritonOps | None:
    """TritonOps on CUDA unless the torch attention backend (the all-torch reference path)
    was configured; None (plain torch) on the CPU."""
    if device.type != "cuda" or attn_name == "torch":
        return None
    return TritonOps()
