"""The fused decode kernel (csrc/decode.cuh): against the float32 reference on fresh random inputs with a poisoned
allocator, and bitwise against the unfused deterministic kernels with the same tile and splits (it computes the
same sums in the same order); dense, Block N:M and joint panels, every decode tile width, K splits, biases and
every gated unit, the routing edge cases, repeated calls (its counters back at rest) and CUDA graphs."""

from dataclasses import replace

import pytest
import torch

import hare
import hare.gpu as hg
from hare.gpu.plan import DECODE_TILE_NS, WeightFormat, plan_moe

from .moe_cases import check_graph_replay, make_routing, make_weights, make_x, poison_allocator, reference, rel_err

pytestmark = pytest.mark.gpu
TOL = 1e-2


def weights(kind, E, H, F, gen=None):
    """dense, sparse (1:2 gate/up, 1:5 down, no shared blocks) or joint (both paired as the tiles pair them)."""
    wgu, wd = make_weights(E, H, F, "cuda", gen)
    if kind == "dense":
        return wgu, wd
    joint = kind == "joint"
    return (hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=F % 128 != 0, joint="halves" if joint else None),
            hare.sparsify(wd, bn=1, bm=5, bw=32, joint=("halves" if H % 256 == 0 else "adjacent") if joint else None))


def _plan(T, k, E, H, F, w_pair, activation, config):
    fmt = lambda wt, K: WeightFormat.of(K, wt.block_idx, wt.bw, wt.joint) if isinstance(wt, hare.BlockNM) \
        else WeightFormat.of(K)  # noqa: E731
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return plan_moe(T, k, E, H, F, fmt(w_pair[0], H), fmt(w_pair[1], F), activation, True, sms, config)


def check(T, H, F, E, k, w_pair, activation="silu", config=None, skew=0.0, only_expert=None, biases=(None, None)):
    """The fused kernel's output: finite, within TOL of the fp32 reference, and equal to the unfused kernels' with
    the same tile and splits."""
    config = replace(config or hg.LaunchConfig(), fused_decode=True)
    p = _plan(T, k, E, H, F, w_pair, activation, config)
    assert p.decode is not None
    x = make_x(T, H, "cuda")
    ids, w = make_routing(T, E, k, "cuda", skew=skew, only_expert=only_expert)
    poison_allocator(8 * T * k * max(H, F) * 4 + (1 << 22), "cuda")
    fused = hg.fused_moe(x, ids, w, *w_pair, activation, True, config, *biases)
    torch.cuda.synchronize()
    assert torch.isfinite(fused).all(), "non-finite output (unwritten rows?)"
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in w_pair]
    err = rel_err(fused, reference(x, ids, w, *dense, activation, *biases))
    assert err < TOL, f"rel err {err:.3e}"
    same = replace(config, tile_n=p.tile_n, gateup_splits=p.gate_up.splits, down_splits=p.down.splits,
                   fused_decode=False)
    unfused = hg.fused_moe(x, ids, w, *w_pair, activation, True, same, *biases)
    assert torch.equal(fused, unfused), "the fused kernel's sums differ from the unfused kernels'"
    return fused


@pytest.mark.parametrize("kind", ["dense", "sparse", "joint"])
@pytest.mark.parametrize("tile_n", DECODE_TILE_NS)
@pytest.mark.parametrize("T", [1, 23, 128])
def test_every_weight_kind_and_tile(kind, tile_n, T):
    H, F = (512, 384) if kind != "joint" else (512, 256)
    check(T, H, F, 16, 4, weights(kind, 16, H, F), config=hg.LaunchConfig(tile_n=tile_n))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("gsplits,dsplits", [(1, 1), (2, 1), (1, 3), (4, 2), (7, 5)])
def test_k_splits(kind, gsplits, dsplits):
    check(5, 1024, 640, 16, 3, weights(kind, 16, 1024, 640),
          config=hg.LaunchConfig(gateup_splits=gsplits, down_splits=dsplits))


@pytest.mark.parametrize("activation", ["silu", "gelu", "clamped-silu:limit=1.5", "gpt-oss:alpha=1.702,limit=0.75"])
@pytest.mark.parametrize("biased", [False, True])
def test_gated_units_and_biases(activation, biased):
    E, H, F = 8, 320, 192  # H % 256 != 0, F % 128 != 0
    biases = (torch.randn(E, 2 * F, device="cuda"), torch.randn(E, H, device="cuda")) if biased else (None, None)
    for T, cfg in ((3, hg.LaunchConfig(gateup_splits=2, down_splits=2)), (40, None)):
        check(T, H, F, E, 2, weights("sparse", E, H, F), activation, cfg, biases=biases)
        check(T, H, F, E, 2, weights("dense", E, H, F), activation, cfg, biases=biases)


def test_routing_edge_cases():
    w_pair = weights("sparse", 64, 1024, 512)
    check(1, 1024, 512, 64, 1, w_pair)  # one row in all
    check(5, 1024, 512, 64, 4, w_pair)  # most experts empty
    check(1000, 1024, 512, 64, 1, w_pair, only_expert=7)  # every row on one expert: 16 row blocks of it
    check(255, 1024, 512, 64, 4, w_pair, skew=1.5)  # R = 1020, the largest calls it takes by default


def test_zero_tokens():
    wgu, wd = weights("dense", 8, 256, 128)
    out = hg.fused_moe(make_x(0, 256, "cuda"), *make_routing(0, 8, 2, "cuda"), wgu, wd,
                       config=hg.LaunchConfig(fused_decode=True))
    assert out.shape == (0, 256)


def test_repeated_calls_leave_the_counters_at_rest():
    """Many calls of different shapes in a row, each bitwise equal to its first run: a counter left off rest would
    release a down tile early (unwritten h) or sum a token twice."""
    cases = []
    for i, (T, E, k, kind) in enumerate([(1, 16, 4, "dense"), (64, 16, 2, "sparse"), (7, 32, 8, "joint")]):
        gen = torch.Generator(device="cuda").manual_seed(i)
        x = make_x(T, 512, "cuda", gen)
        ids, w = make_routing(T, E, k, "cuda", gen=gen)
        w_pair = weights(kind, E, 512, 256, gen)
        cases.append((x, ids, w, w_pair, hg.fused_moe(x, ids, w, *w_pair)))
    for _ in range(5):
        for x, ids, w, w_pair, first in cases:
            assert torch.equal(hg.fused_moe(x, ids, w, *w_pair), first)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("T", [1, 64])
def test_cuda_graph_replay(kind, T):
    check_graph_replay(T, 32, 4, *weights(kind, 32, 2048, 768), TOL, hg.LaunchConfig(fused_decode=True))


def test_the_default_plan_runs_it_on_dense_weights_at_its_rows():
    T, k = 16, 4  # 64 rows: in [DECODE_MIN_ROWS, DECODE_MAX_ROWS]
    w_pair = weights("dense", 32, 1024, 512)
    assert _plan(T, k, 32, 1024, 512, w_pair, "silu", hg.LaunchConfig()).decode is not None
    check_graph_replay(T, 32, k, *w_pair, TOL)
