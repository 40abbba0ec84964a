"""The Block N:M sparse kernels (wgmma.mma_async.sp) against the float32 reference on the to_dense() weights:
every ratio and block width, partial windows, out sizes not multiple of 128, every token-tile size, K splits,
mixed dense/sparse projections, edge cases of the routing, CUDA graphs and torch.compile."""

import pytest
import torch

import hare
import hare.gpu as hg
from hare.blocknm import DENSITIES
from hare.gpu.plan import TILE_NS, WeightFormat

from .moe_cases import (MODELS, check_graph_replay,
                         make_routing, make_weights, make_x, poison_allocator, reference, rel_err)

pytestmark = pytest.mark.gpu
TOL = 1e-2
RATIOS = sorted(DENSITIES.values())


def sparse_weights(E, H, F, bn, bm, bw, gen=None, joint=False):
    """joint: gate panel m with up panel m, down panels m with m + P/2 where H % 256 == 0, else 2m with 2m + 1."""
    wgu, wd = make_weights(E, H, F, "cuda", gen)
    gu_joint, d_joint = ("halves", "halves" if H % 256 == 0 else "adjacent") if joint else (None, None)
    return (hare.sparsify(wgu, bn=bn, bm=bm, bw=bw, joint=gu_joint, halves=joint and F % 128 != 0),
            hare.sparsify(wd, bn=bn, bm=bm, bw=bw, joint=d_joint))


def kinds(weights, H, F):
    """The weight kinds (hare.gpu.plan.WEIGHT_KINDS) the gate/up and down GEMMs run for these weights."""
    fmt = lambda w, K: WeightFormat.of(K, w.block_idx, w.bw, w.joint)  # noqa: E731
    return fmt(weights[0], H).kind("gateup"), fmt(weights[1], F).kind("down")


def check(T, H, F, E, k, weights, activation="silu", deterministic=True, skew=0.0, only_expert=None, config=None):
    sgu, sd = weights
    x = make_x(T, H, "cuda")
    ids, w = make_routing(T, E, k, "cuda", skew=skew, only_expert=only_expert)
    poison_allocator(8 * T * k * max(H, F) * 2 + (1 << 20), "cuda")
    out = hg.fused_moe(x, ids, w, sgu, sd, activation=activation, deterministic=deterministic, config=config)
    torch.cuda.synchronize()
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    if T == 0:
        return out
    assert torch.isfinite(out).all(), "non-finite output (unwritten rows?)"
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in (sgu, sd)]
    err = rel_err(out, reference(x, ids, w, *dense, activation))
    assert err < TOL, f"rel err {err:.3e}"
    return out


@pytest.mark.parametrize("bw", [16, 32, 64])
@pytest.mark.parametrize("bn,bm", RATIOS)
@pytest.mark.parametrize("T", [1, 77, 700])
def test_every_ratio_and_block_width(bn, bm, bw, T):
    # H = 704: 44 blocks of 16 (a partial last window for 1:5, 1:10, and an odd kept count at 1:5), 11 of 64;
    # H % 128 = 64 and H % 256 = 192: the down projection's last panel is partial and its last tile half empty.
    H, F, E, k = 704, 384, 8, 2
    check(T, H, F, E, k, sparse_weights(E, H, F, bn, bm, bw), skew=1.0 if T == 700 else 0.0)


@pytest.mark.parametrize("bw", [16, 64])
@pytest.mark.parametrize("bn,bm", RATIOS)
@pytest.mark.parametrize("H,F", [(704, 384), (512, 320), (1024, 256)])
def test_joint_panels_run_the_one_token_tile_kernels(H, F, bn, bm, bw):
    # 704: down paired adjacent, H % 256 = 192 (the last tile's second box past the last panel); 512 and 1024: down
    # tiles pair panels m and m + P/2; F = 320: ffn % 128 = 64, gate/up in the halves layout
    E, k = 8, 2
    weights = sparse_weights(E, H, F, bn, bm, bw, joint=True)
    assert kinds(weights, H, F) == ("joint", "joint")
    for T in (1, 77, 700):
        check(T, H, F, E, k, weights, skew=1.0 if T == 700 else 0.0)


@pytest.mark.parametrize("bn_tile", TILE_NS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("joint", [False, True])
def test_every_token_tile(bn_tile, activation, deterministic, joint):
    weights = sparse_weights(12, 320, 256, 1, 2, 16, joint=joint)
    assert kinds(weights, 320, 256) == (("joint", "joint") if joint else ("sparse", "sparse"))
    for T in (1, 33, 1000):
        check(T, 320, 256, 12, 3, weights, activation=activation, deterministic=deterministic, skew=0.8,
              config=hg.LaunchConfig(tile_n=bn_tile))


@pytest.mark.parametrize("model", list(MODELS))
def test_model_shapes_at_25_percent(model):
    H, F, E, k = MODELS[model]
    weights = sparse_weights(E, H, F, 1, 2, 16)
    for T in (1, 300):
        check(T, H, F, E, k, weights, skew=1.0 if T == 300 else 0.0)


def test_mixed_dense_and_sparse_projections():
    H, F, E, k = 1024, 512, 16, 4
    wgu, wd = make_weights(E, H, F, "cuda")
    sgu, sd = hare.sparsify(wgu, bn=1, bm=5, bw=32), hare.sparsify(wd, bn=1, bm=1, bw=64)
    check(150, H, F, E, k, (sgu, wd))
    check(150, H, F, E, k, (wgu, sd))


def test_routing_edge_cases():
    H, F, E = 1024, 512, 64
    weights = sparse_weights(E, H, F, 1, 2, 16)
    out = check(0, H, F, E, 2, weights)
    assert out.numel() == 0
    check(1, H, F, E, 2, weights)
    check(5, H, F, E, 4, weights)  # most experts empty
    for det in (True, False):
        check(1000, H, F, E, 1, weights, only_expert=3, deterministic=det)
    for T in (127, 129, 2049):
        check(T, H, F, E, 2, weights, skew=1.5)


@pytest.mark.parametrize("gsplits,dsplits", [(2, 1), (3, 2), (5, 4)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_k_splits(gsplits, dsplits, deterministic):
    config = hg.LaunchConfig(gateup_splits=gsplits, down_splits=dsplits)
    # 1:1 at bw 16: 20 and 10 stages of 64 kept columns; 1:5: 4 and 2 stages (splits larger than that are cut)
    for bn, bm in ((1, 1), (1, 5)):
        check(7, 1280, 640, 16, 3, sparse_weights(16, 1280, 640, bn, bm, 16), deterministic=deterministic,
              config=config)


def test_deterministic_is_bitwise_repeatable():
    H, F, E, k = 1024, 512, 16, 4
    sgu, sd = sparse_weights(E, H, F, 1, 2, 16)
    x = make_x(700, H, "cuda")
    ids, w = make_routing(700, E, k, "cuda")
    assert torch.equal(hg.fused_moe(x, ids, w, sgu, sd), hg.fused_moe(x, ids, w, sgu, sd))


def test_cuda_graph_replay_and_compile():
    sgu, sd = sparse_weights(32, 2048, 768, 1, 5, 16)
    x2, ids2, w2 = check_graph_replay(64, 32, 4, sgu, sd, TOL)
    compiled = torch.compile(lambda x, i, w: hg.fused_moe(x * 1.0, i, w, sgu, sd), fullgraph=True)
    assert torch.equal(compiled(x2, ids2, w2), hg.fused_moe(x2, ids2, w2, sgu, sd))


def test_bad_sparse_inputs_are_refused_before_any_kernel():
    H, F, E = 512, 192, 4
    wgu, wd = make_weights(E, H, F, "cuda")
    x = make_x(3, H, "cuda")
    ids, w = make_routing(3, E, 2, "cuda")
    with pytest.raises(hare.InvalidArgumentError, match="multiple of 128"):
        hg.fused_moe(x, ids, w, hare.sparsify(wgu, bn=1, bm=2), wd)
    with pytest.raises(hare.InvalidArgumentError, match="bfloat16"):
        hg.fused_moe(x, ids, w, wgu, hare.sparsify(wd, bn=1, bm=2, dtype=torch.float16))
    with pytest.raises(hare.InvalidArgumentError, match="stacked"):
        hg.fused_moe(x, ids, w, wgu, hare.sparsify(wd[0], bn=1, bm=2))
    with pytest.raises(hare.InvalidArgumentError, match="expected shape"):
        hg.fused_moe(x, ids, w, wgu, hare.sparsify(wd[:, :, :128].contiguous(), bn=1, bm=2))
