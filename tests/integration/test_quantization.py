"""Weight-only quantization (``--quantization int8|int4``) on the embedded SmolLM2 against the
bf16 model: next-token log-probability error and greedy agreement on chat prompts, measured
by ``bench/quant_quality.py`` (whose full run, with speed, is in docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from bench.quant_quality import quality

pytestmark = pytest.mark.slow


def test_int8_and_int4_stay_close_to_bf16():
    res = quality(["none", "int8", "int4"], n=24, num_prompts=8)
    for mode in ("int8", "int4"):
        r = res[mode]
        assert r["top1_agreement"] >= 0.85, (mode, r)
        assert r["next_token_abs_logprob_err_mean"] < 0.2, (mode, r)
        assert r["next_token_abs_logprob_err_max"] < 0.6, (mode, r)
        assert r["greedy_common_prefix_mean"] >= 10, (mode, r)
