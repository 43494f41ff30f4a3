"""Programmatic dependent launch (Hopper and newer; a plain launch elsewhere): a kernel
launched with ``pdl=True`` reads what the kernel just before it wrote, inside a CUDA graph
replayed with new inputs each time. A gate in the wrong place shows up as stale inputs."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.decode_attention import decode_attention
from encore.kernels.gemv import gemv
from tests.kernels.conftest import DEVICE, paged_batch, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")]


def test_pdl_kernels_see_what_the_kernel_before_wrote():
    d, n, bf16 = 4096, 6144, torch.bfloat16
    w = (torch.randn(n, d, device=DEVICE) / 64).to(bf16)
    w_o = w[:d, :d].contiguous()  # weights are never written by the kernel before a PDL GEMV
    nw = (torch.rand(d, device=DEVICE) + 0.5).to(bf16)
    src, x = torch.empty(1, d, device=DEVICE, dtype=bf16), torch.empty(1, d, device=DEVICE,
                                                                       dtype=bf16)
    y = torch.empty(1, n, device=DEVICE, dtype=bf16)
    res = torch.zeros(1, d, device=DEVICE, dtype=bf16)
    kv, tables = paged_batch([777], 16, 8, 128, bf16)
    lens = torch.tensor([777], dtype=torch.int32, device=DEVICE)
    qsrc = torch.empty(1, 32, 128, device=DEVICE, dtype=bf16)
    q, o = torch.empty_like(qsrc), torch.empty_like(qsrc)

    def body() -> None:
        torch.mul(src, 2.0, out=x)  # the kernel just before each PDL launch writes its input
        gemv(x, w, norm_weight=nw, eps=1e-5, out=y, pdl=True)
        gemv(y[:, :d].contiguous(), w_o, residual=res, pdl=True)
        torch.mul(qsrc, 2.0, out=q)
        decode_attention(q, kv, tables, lens, 0.088, 1024, out=o, pdl=True)

    src.normal_(), qsrc.normal_()
    body()  # autotune, outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(10):
        src.normal_(), qsrc.normal_(), res.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_y = R.gemv((src * 2.0).to(bf16), w, norm_weight=nw, eps=1e-5)
        assert rel_err(y, ref_y) < 1e-2
        ref_res = R.gemv(ref_y[:, :d].contiguous(), w_o, residual=torch.zeros_like(res))
        assert rel_err(res, ref_res) < 2e-2
        ref_o = R.decode_attention((qsrc * 2.0).to(bf16), kv, tables, lens, 0.088)
        assert rel_err(o, ref_o) < 1e-2
