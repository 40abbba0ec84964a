"""The Hopper kernels' expert biases and clamped gated units (GPT-OSS's clamped SwiGLU, clamped SiLU), and a Block N:M
gate/up at ffn % 128 = 64 (the halves layout), against the float32 reference: dense and every ratio and bw, every
token tile, K splits, both combine modes, the routing edge cases and CUDA-graph replay."""

import pytest
import torch

import hare
import hare.gpu as hg
from hare.blocknm import DENSITIES
from hare.gpu.plan import TILE_NS
from hare.moe import backend

from .moe_cases import make_routing, make_weights, make_x, poison_allocator, reference, rel_err

pytestmark = pytest.mark.gpu
TOL = 1e-2
RATIOS = sorted(DENSITIES.values())
# limits near one standard deviation of the projections (~N(0, 1) here, more with biases), so the clamps act
UNITS = ["silu", "gelu", "clamped-silu:limit=0.75", "gpt-oss", "gpt-oss:alpha=1.2,limit=0.6"]


def biases(E, H, F, which="both"):
    gu = torch.randn(E, 2 * F, device="cuda") * 0.5 if which in ("both", "gate_up") else None
    dn = torch.randn(E, H, device="cuda") * 0.5 if which in ("both", "down") else None
    return gu, dn


def prune(weights, ratio, bw):
    wgu, wd = weights
    if ratio is None:
        return wgu, wd
    return hare.sparsify(wgu, bn=ratio[0], bm=ratio[1], bw=bw, halves=True), hare.sparsify(wd, bn=ratio[0],
                                                                                          bm=ratio[1], bw=bw)


def check(T, E, k, weights, bias, activation, deterministic=True, skew=0.0, only_expert=None, config=None,
          public=False):
    wgu, wd = weights
    H = wgu.shape[2]
    x = make_x(T, H, "cuda")
    ids, w = make_routing(T, E, k, "cuda", skew=skew, only_expert=only_expert)
    poison_allocator(8 * T * k * H * 4 + (1 << 20), "cuda")
    if public:
        assert backend(x, wgu, wd, activation) == ("hopper", "")
        out = hare.moe(x, ids, w, wgu, wd, activation, deterministic, gate_up_bias=bias[0], down_bias=bias[1])
    else:
        out = hg.fused_moe(x, ids, w, wgu, wd, activation, deterministic, config, gate_up_bias=bias[0],
                           down_bias=bias[1])
    torch.cuda.synchronize()
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    if T == 0:
        return out
    assert torch.isfinite(out).all(), "non-finite output (unwritten rows?)"
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in (wgu, wd)]
    err = rel_err(out, reference(x, ids, w, *dense, activation, *bias))
    assert err < TOL, f"rel err {err:.3e}"
    return out


@pytest.mark.parametrize("activation", UNITS)
@pytest.mark.parametrize("which", ["none", "gate_up", "down", "both"])
@pytest.mark.parametrize("ratio", [None, (1, 2)])
def test_every_unit_with_and_without_biases(activation, which, ratio):
    H, F, E, k = 320, 192, 8, 2  # H % 256 != 0, F % 128 = 64
    weights = prune(make_weights(E, H, F, "cuda"), ratio, 16)
    bias = biases(E, H, F, which)
    for T in (1, 45, 600):
        check(T, E, k, weights, bias, activation, skew=1.0 if T == 600 else 0.0)


def test_the_clamps_act():
    """With a low limit the kernels give the clamped reference, which is far from the unclamped one."""
    H, F, E, k, T = 256, 128, 4, 2, 200
    (wgu, wd), (bgu, bd) = make_weights(E, H, F, "cuda"), biases(E, H, F)
    x, (ids, w) = make_x(T, H, "cuda"), make_routing(T, E, k, "cuda")
    for unit, loose in (("gpt-oss:alpha=1.702,limit=0.3", "gpt-oss:alpha=1.702,limit=1e6"),
                        ("clamped-silu:limit=0.3", "silu")):
        out = hg.fused_moe(x, ids, w, wgu, wd, unit, gate_up_bias=bgu, down_bias=bd)
        assert rel_err(out, reference(x, ids, w, wgu, wd, unit, bgu, bd)) < TOL
        assert rel_err(out, reference(x, ids, w, wgu, wd, loose, bgu, bd)) > 0.2


@pytest.mark.parametrize("bw", [16, 32, 64])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("T", [1, 77, 700])
def test_gate_up_at_ffn_128_plus_64_every_ratio_and_width(ratio, bw, T):
    # F = 320 (2.5 panels per half): the last gate and up panels hold 64 rows; H = 704: partial windows at bw 16
    H, F, E, k = 704, 320, 6, 2
    weights = prune(make_weights(E, H, F, "cuda"), ratio, bw)
    assert weights[0].block_idx.shape[1] == 6  # three panels per half
    check(T, E, k, weights, biases(E, H, F), "gpt-oss", skew=1.0 if T == 700 else 0.0)


@pytest.mark.parametrize("joint", ["halves", None])
def test_joint_halves_at_ffn_128_plus_64(joint):
    H, F, E, k = 512, 192, 8, 2
    wgu, wd = make_weights(E, H, F, "cuda")
    sgu = hare.sparsify(wgu, bn=1, bm=2, bw=32, halves=True, joint=joint)
    sd = hare.sparsify(wd, bn=1, bm=2, bw=32, joint="adjacent" if joint else None)
    for T in (3, 300):
        check(T, E, k, (sgu, sd), biases(E, H, F), "silu")


@pytest.mark.parametrize("tile_n", TILE_NS)
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("ratio", [None, (1, 5)])
def test_every_token_tile_and_combine_mode(tile_n, deterministic, ratio):
    H, F, E, k = 576, 192, 12, 3
    weights = prune(make_weights(E, H, F, "cuda"), ratio, 32)
    bias = biases(E, H, F)
    for T in (1, 33, 1000):
        check(T, E, k, weights, bias, "clamped-silu:limit=0.75", deterministic, skew=0.8,
              config=hg.LaunchConfig(tile_n=tile_n))


@pytest.mark.parametrize("gsplits,dsplits", [(2, 1), (3, 2), (5, 4)])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("ratio", [None, (1, 2)])
def test_k_splits_add_each_bias_once(gsplits, dsplits, deterministic, ratio):
    """Split K: split 0 alone adds the biases (partials summed by hare_glu_combine / hare_combine or atomics)."""
    H, F, E, k = 1280, 640, 16, 3
    weights = prune(make_weights(E, H, F, "cuda"), ratio, 16)
    config = hg.LaunchConfig(gateup_splits=gsplits, down_splits=dsplits)
    for activation in ("gpt-oss:alpha=1.702,limit=0.75", "gelu"):
        check(7, E, k, weights, biases(E, H, F), activation, deterministic, config=config)


@pytest.mark.parametrize("ratio", [None, (1, 10)])
def test_edge_cases(ratio):
    H, F, E = 320, 192, 16
    weights = prune(make_weights(E, H, F, "cuda"), ratio, 16)
    bias = biases(E, H, F)
    assert check(0, E, 2, weights, bias, "gpt-oss").numel() == 0
    check(1, E, 2, weights, bias, "gpt-oss")
    check(5, E, 4, weights, bias, "gpt-oss")  # most experts empty
    for det in (True, False):
        check(1000, E, 1, weights, bias, "gpt-oss", det, only_expert=5)  # top-1, every token on one expert


def test_hare_moe_takes_the_kernels_with_bf16_biases():
    """hare.moe runs biased, clamped layers on the kernels (biases of any float dtype, added in fp32)."""
    H, F, E, k = 2880 // 5, 2880 // 5, 8, 4  # GPT-OSS's sizes % 128 = 64 (scaled down)
    weights = prune(make_weights(E, H, F, "cuda"), (1, 2), 16)
    bias = tuple(b.bfloat16() for b in biases(E, H, F))
    check(300, E, k, weights, bias, "gpt-oss", public=True)
    check(300, E, k, make_weights(E, H, F, "cuda"), bias, "gpt-oss", public=True)


@pytest.mark.parametrize("ratio", [None, (1, 2)])
def test_cuda_graph_replay_with_biases(ratio):
    H, F, E, k, T = 704, 320, 8, 4, 64
    wgu, wd = prune(make_weights(E, H, F, "cuda"), ratio, 16)
    bgu, bd = biases(E, H, F)
    run = lambda x, ids, w: hg.fused_moe(x, ids, w, wgu, wd, "gpt-oss", gate_up_bias=bgu, down_bias=bd)  # noqa: E731
    x, (ids, w) = make_x(T, H, "cuda"), make_routing(T, E, k, "cuda")
    eager = run(x, ids, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(x, ids, w)
    x2, (ids2, w2) = make_x(T, H, "cuda"), make_routing(T, E, k, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
    bgu.mul_(-1.0)  # biases are read at replay time too
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in (wgu, wd)]
    assert rel_err(out, reference(x2, ids2, w2, *dense, "gpt-oss", bgu, bd)) < TOL
