"""The few-token path (csrc/gemv.cuh): against the float32 reference on fresh random inputs with a poisoned
allocator; dense, every Block N:M ratio and bw, the halves layout, joint panels, mixed projections, biases and
every gated unit, sizes off every tile, the routing edge cases, bitwise repeatability, the id check and CUDA
graphs; and the plan's own choice of it."""

import pytest
import torch

import hare
import hare.gpu as hg
from hare.errors import InvalidArgumentError
from hare.gpu.plan import GEMV_MAX_ROWS, GEMV_SPARSE_ROWS

from .moe_cases import check_graph_replay, make_routing, make_weights, make_x, poison_allocator, reference, rel_err

pytestmark = pytest.mark.gpu
TOL = 1e-2
GEMV = hg.LaunchConfig(gemv=True)


def sparse_pair(wgu, wd, ratio, bw, halves=False, joint=False):
    bn, bm = ratio
    F = wd.shape[2]
    return (hare.sparsify(wgu, bn=bn, bm=bm, bw=bw, halves=halves or F % 128 != 0,
                          joint="halves" if joint else None),
            hare.sparsify(wd, bn=bn, bm=bm, bw=bw, joint="adjacent" if joint else None))


def check(T, H, F, E, k, w_pair, activation="silu", skew=0.0, only_expert=None, biases=(None, None), config=GEMV):
    x = make_x(T, H, "cuda")
    ids, w = make_routing(T, E, k, "cuda", skew=skew, only_expert=only_expert)
    poison_allocator(8 * T * k * max(H, F) * 4 + (1 << 22), "cuda")
    out = hg.fused_moe(x, ids, w, *w_pair, activation, True, config, *biases)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "non-finite output (unwritten rows?)"
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in w_pair]
    err = rel_err(out, reference(x, ids, w, *dense, activation, *biases))
    assert err < TOL, f"rel err {err:.3e}"
    again = hg.fused_moe(x, ids, w, *w_pair, activation, True, config, *biases)
    assert torch.equal(out, again), "not bitwise repeatable"
    return out


@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_dense(T):
    check(T, 1024, 704, 16, 4, make_weights(16, 1024, 704, "cuda"))


@pytest.mark.parametrize("ratio", [(1, 1), (1, 2), (1, 5), (1, 10), (2, 5)])
@pytest.mark.parametrize("bw", [16, 32, 64])
def test_every_ratio_and_bw(ratio, bw):
    H, F = 704, 384  # a partial last window, H % 128 = 64: the down weight's last panel is partial
    wgu, wd = make_weights(8, H, F, "cuda")
    for T in (1, 13):
        check(T, H, F, 8, 2, sparse_pair(wgu, wd, ratio, bw))


@pytest.mark.parametrize("joint", [False, True])
def test_halves_layout_and_joint_panels(joint):
    H, F = 512, 320  # F % 128 != 0: the gate/up weight in the halves layout
    wgu, wd = make_weights(8, H, F, "cuda")
    check(5, H, F, 8, 3, sparse_pair(wgu, wd, (1, 2), 16, halves=True, joint=joint))


def test_mixed_projections():
    H, F = 512, 256
    wgu, wd = make_weights(8, H, F, "cuda")
    sgu, sdn = sparse_pair(wgu, wd, (1, 5), 16)
    check(3, H, F, 8, 2, (sgu, wd))
    check(3, H, F, 8, 2, (wgu, sdn))


@pytest.mark.parametrize("activation", ["silu", "gelu", "clamped-silu:limit=1.5", "gpt-oss:alpha=1.702,limit=0.75"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gated_units_and_biases(activation, sparse):
    E, H, F = 8, 320, 192
    wgu, wd = make_weights(E, H, F, "cuda")
    pair = sparse_pair(wgu, wd, (1, 2), 16) if sparse else (wgu, wd)
    biases = (torch.randn(E, 2 * F, device="cuda"), torch.randn(E, H, device="cuda"))
    check(4, H, F, E, 2, pair, activation, biases=biases)
    check(4, H, F, E, 2, pair, activation)


@pytest.mark.parametrize("sparse", [False, True])
def test_routing_edge_cases(sparse):
    E, H, F = 16, 512, 256
    wgu, wd = make_weights(E, H, F, "cuda")
    pair = sparse_pair(wgu, wd, (1, 5), 32) if sparse else (wgu, wd)
    check(1, H, F, E, 1, pair)  # one token, top-1
    check(9, H, F, E, 1, pair, only_expert=3)  # every token on one expert
    check(6, H, F, E, 8, pair, skew=2.0)  # top-8 of 16, skewed
    check(16, H, F, E, 4, pair)
    out = hg.fused_moe(make_x(0, H, "cuda"), torch.zeros(0, 2, dtype=torch.int64, device="cuda"),
                       torch.zeros(0, 2, device="cuda"), *pair, config=GEMV)
    assert out.shape == (0, H)


def test_model_shapes():
    for E, H, F, k in ((128, 2048, 768, 8), (64, 2048, 1408, 6)):  # Qwen3-30B-A3B, DeepSeek-V2-Lite
        wgu, wd = make_weights(E, H, F, "cuda")
        check(1, H, F, E, k, (wgu, wd))
        check(3, H, F, E, k, sparse_pair(wgu, wd, (1, 10), 16))


def test_graph_replay():
    wgu, wd = make_weights(16, 512, 256, "cuda")
    check_graph_replay(3, 16, 4, wgu, wd, TOL, GEMV)
    check_graph_replay(3, 16, 4, *sparse_pair(wgu, wd, (1, 2), 16), TOL, GEMV)


def test_the_id_check_reports_bad_ids_and_poisons_the_output():
    E, H, F = 8, 256, 128
    wgu, wd = make_weights(E, H, F, "cuda")
    x = make_x(2, H, "cuda")
    w = torch.softmax(torch.randn(2, 2, device="cuda"), dim=-1)
    bad = torch.tensor([[0, 1], [2, 9]], device="cuda")
    out = hg.fused_moe(x, bad, w, wgu, wd, config=GEMV, check_ids=True)
    torch.cuda.synchronize()
    assert torch.isnan(out).all()
    with pytest.raises(InvalidArgumentError, match="token 1, slot 1: expert id 9 is not in"):
        hg.check_errors()
    twice = torch.tensor([[0, 1], [4, 4]], device="cuda")
    out = hg.fused_moe(x, twice, w, wgu, wd, config=GEMV, check_ids=True)
    with pytest.raises(InvalidArgumentError, match="token 1 is routed to expert 4 twice"):
        hg.check_errors()
    good = hg.fused_moe(x, torch.tensor([[0, 1], [2, 3]], device="cuda"), w, wgu, wd, config=GEMV, check_ids=True)
    hg.check_errors()
    assert torch.isfinite(good).all()


def test_the_plan_takes_it_at_few_rows():
    """Dense and 1:4 weights up to GEMV_MAX_ROWS rows, 1:10 (5%) weights up to GEMV_SPARSE_ROWS: the default call is
    the few-token path's, bit for bit, and agrees with the GEMM path."""
    wgu, wd = make_weights(16, 512, 256, "cuda")
    thin = sparse_pair(wgu, wd, (1, 10), 16)
    for pair, T, k in (((wgu, wd), 1, 2), ((wgu, wd), GEMV_MAX_ROWS // 2, 2),
                       (sparse_pair(wgu, wd, (1, 4), 16), GEMV_MAX_ROWS // 4, 4), (thin, GEMV_SPARSE_ROWS // 4, 4)):
        x, (ids, w) = make_x(T, 512, "cuda"), make_routing(T, 16, k, "cuda")
        auto = hg.fused_moe(x, ids, w, *pair)
        off = hg.fused_moe(x, ids, w, *pair, config=hg.LaunchConfig(gemv=False))
        assert rel_err(auto, off) < TOL
        assert torch.equal(auto, hg.fused_moe(x, ids, w, *pair, config=GEMV))
