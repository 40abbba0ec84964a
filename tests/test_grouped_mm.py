"""hare.grouped_mm: the grouped-GEMM experts (the CUDA path for layers the Hopper kernels do not take) compute the
reference function; run here on the CPU, where PyTorch's grouped GEMM exists too."""

import pytest
import torch

import hare
from hare.grouped_mm import grouped_mm_moe

from helpers import naive_moe, random_topk, rel_error


def _case(t, e, k, hidden, ffn, gen, skew=0.0):
    bf = torch.bfloat16
    x = (torch.randn(t, hidden, generator=gen) * 3).to(bf)
    ids = random_topk(t, e, k, gen, skew=skew)
    w = torch.rand(t, k, generator=gen)
    wg = (torch.randn(e, 2 * ffn, hidden, generator=gen) / hidden**0.5).to(bf)
    wd = (torch.randn(e, hidden, ffn, generator=gen) / ffn**0.5).to(bf)
    return x, ids, w, wg, wd


@pytest.mark.parametrize("activation", ["silu", "gelu", "gpt-oss", "clamped-silu:limit=2.0"])
@pytest.mark.parametrize("t,e,k,skew", [(37, 8, 2, 0.0), (64, 16, 4, 4.0), (1, 8, 3, 0.0)])
def test_grouped_mm_path_matches_the_naive_loop_with_biases(activation, t, e, k, skew, gen):
    x, ids, w, wg, wd = _case(t, e, k, 64, 48, gen, skew)
    bg, bd = torch.randn(e, 96, generator=gen).to(x.dtype), torch.randn(e, 64, generator=gen).to(x.dtype)
    out = grouped_mm_moe(x, ids, w, wg, wd, activation, gate_up_bias=bg, down_bias=bd)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert rel_error(out, naive_moe(x, ids, w, wg, wd, activation, bg, bd)) < 1e-2
    assert rel_error(grouped_mm_moe(x, ids, w, wg, wd, activation), naive_moe(x, ids, w, wg, wd, activation)) < 1e-2


def test_grouped_mm_path_takes_blocknm_weights_empty_experts_and_no_tokens(gen):
    x, ids, w, wg, wd = _case(20, 8, 1, 64, 48, gen)
    ids[:] = 3  # every token to one expert: seven empty groups
    sg = hare.sparsify(wg, bn=1, bm=2)
    assert rel_error(grouped_mm_moe(x, ids, w, sg, wd), naive_moe(x, ids, w, sg.to_dense(), wd)) < 1e-2
    empty = grouped_mm_moe(x[:0], ids[:0], w[:0], wg, wd)
    assert empty.shape == (0, 64)
