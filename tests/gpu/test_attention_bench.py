"""hare.bench.attention on the GPU: a short run records every variant with finite times and bandwidths."""

import math

import pytest

from hare.bench.attention import run

pytestmark = pytest.mark.gpu


def test_attention_benchmark_short_run(tmp_path):
    out = tmp_path / "attention.json"
    result = run(models=["DeepSeek-V2-Lite", "Qwen3-30B-A3B"], batches=[1, 32], contexts=[128, 129],
                 out_json=out)
    cases = sorted((r["model"], r["tokens"], r["context"], r["variant"]) for r in result["records"])
    assert cases == sorted((m, b, c, "hare") for m in ("DeepSeek-V2-Lite", "Qwen3-30B-A3B") for b in (1, 32)
                           for c in (128, 129))
    assert all(r["ours_ms"] > 0 and math.isfinite(r["frac_copy_bw"]) for r in result["records"])
    assert out.exists() and result["gpu"]
