"""The device-side id check of hare.moe (issue 13; hare.gpu's module docstring): a bad id (out of range, or one
expert twice in a token) makes the call's output NaN and is raised, naming the token, at the next call on the
device or at hare.gpu.check_errors(); valid routings never trip it; it works inside CUDA graphs."""

import re

import pytest
import torch

import hare
import hare.gpu as hg
from hare.errors import InvalidArgumentError

from .moe_cases import make_routing, make_weights, make_x, reference, rel_err

pytestmark = pytest.mark.gpu
H, F, E, K = 256, 128, 8, 2
TOL = 1e-2


@pytest.fixture(autouse=True)
def _no_pending_error():
    """A test that fails half way must not leave its bad ids to the next test's first call."""
    yield
    try:
        hg.check_errors()
    except InvalidArgumentError:
        pass


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return make_weights(E, H, F, "cuda")


def _inputs(T, k=K, experts=E, skew=0.0, dtype=torch.int64):
    x = make_x(T, H, "cuda")
    ids, w = make_routing(T, experts, k, "cuda", skew=skew)
    return x, ids.to(dtype), w


def _capture(x, ids, w, wgu, wd, warm_up=True):
    """hare.moe on a copy of the ids captured as a CUDA graph (after a warm-up call on a side stream): (graph, the
    captured ids, the output each replay rewrites)."""
    sids = ids.clone()
    if warm_up:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            hare.moe(x, sids, w, wgu, wd)
        torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hare.moe(x, sids, w, wgu, wd)
    return graph, sids, out


def _good_call(x, ids, w, wgu, wd, **kw):
    out = hare.moe(x, ids, w, wgu, wd, **kw)
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, ids, w, wgu, wd)) < TOL
    return out


@pytest.mark.parametrize("T", [1, 37, 1500])  # 1500 tokens x top-2: two layout tiles (the last CTA records)
@pytest.mark.parametrize("value", [E, 10 ** 12, -1])
def test_an_out_of_range_id_gives_nan_and_is_raised_at_the_next_call(weights, T, value):
    wgu, wd = weights
    x, ids, w = _inputs(T)
    bad = ids.clone()
    t = T // 2
    bad[t, 1] = value
    out = hare.moe(x, bad, w, wgu, wd)
    torch.cuda.synchronize()
    assert torch.isnan(out.float()).all(), "the bad call's output must not look valid"
    with pytest.raises(InvalidArgumentError, match=re.escape(f"token {t}, slot 1: expert id {value} is not in "
                                                             f"[0, {E})")):
        hare.moe(x, ids, w, wgu, wd)
    _good_call(x, ids, w, wgu, wd)  # raised once: the next call runs and is right


@pytest.mark.parametrize("T,k", [(5, 2), (300, 4), (2000, 4)])
def test_one_expert_twice_in_a_token_gives_nan_and_names_both_slots(weights, T, k):
    wgu, wd = weights
    x, ids, w = _inputs(T, k=k)
    bad = ids.clone()
    t = T - 1
    bad[t, k - 1] = bad[t, 0]
    out = hare.moe(x, bad, w, wgu, wd)
    with pytest.raises(InvalidArgumentError, match=rf"token {t} is routed to expert {int(bad[t, 0])} twice "
                                                   rf"\(slots 0 and {k - 1}\)"):
        hg.check_errors()  # synchronizes, then reads the record
    assert torch.isnan(out.float()).all()
    hg.check_errors()  # raised once
    _good_call(x, ids, w, wgu, wd)


def test_the_first_bad_id_of_the_call_is_reported(weights):
    wgu, wd = weights
    x, ids, w = _inputs(3000)  # three layout tiles: CTAs finish in any order
    bad = ids.clone()
    bad[2500, 0] = -7
    bad[1200, 1] = E + 3
    bad[1999, 1] = bad[1999, 0]
    hare.moe(x, bad, w, wgu, wd)
    with pytest.raises(InvalidArgumentError, match=r"token 1200, slot 1: expert id 11 is not in \[0, 8\), in an "
                                                   r"earlier hare.moe call on cuda:0 \(3000 tokens, top-2\)"):
        hg.check_errors()


def test_bad_calls_while_one_is_pending_are_counted(weights):
    """Graph replays read nothing on the host: two bad replays, one record (the first), and the count."""
    wgu, wd = weights
    x, ids, w = _inputs(32)
    _good_call(x, ids, w, wgu, wd)
    graph, sids, _ = _capture(x, ids, w, wgu, wd)
    sids[4, 0] = E
    graph.replay()
    sids[4, 0], sids[9, 1] = ids[4, 0], -1
    graph.replay()
    with pytest.raises(InvalidArgumentError, match=r"token 4, slot 0: expert id 8 .*; 1 later call\(s\) had bad"):
        hg.check_errors()
    hg.check_errors()


@pytest.mark.parametrize("det", [True, False])
@pytest.mark.parametrize("k", [1, 3])  # top-1 deterministic: the down GEMM writes the output directly
@pytest.mark.parametrize("sparse", [False, True])
def test_every_output_path_is_nan_after_a_bad_id(weights, det, k, sparse):
    wgu, wd = weights
    if sparse:
        wgu, wd = hare.sparsify(wgu, bn=1, bm=2, bw=16), hare.sparsify(wd, bn=1, bm=2, bw=16)
    x, ids, w = _inputs(64, k=k)
    bad = ids.clone()
    bad[10, 0] = 99
    out = hare.moe(x, bad, w, wgu, wd, deterministic=det)
    torch.cuda.synchronize()
    assert torch.isnan(out.float()).all()
    with pytest.raises(InvalidArgumentError, match="token 10, slot 0: expert id 99"):
        hg.check_errors()


@pytest.mark.parametrize("T,E_,k,skew", [(1, 8, 2, 0.0), (16, 128, 8, 0.0), (64, 32, 4, 1.2), (777, 16, 1, 0.0),
                                         (2049, 64, 6, 2.0), (5000, 8, 2, 0.0), (300, 1, 1, 0.0),
                                         (129, 60, 60, 0.0)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_valid_routings_never_trip_the_check_and_give_the_unchecked_output(T, E_, k, skew, dtype):
    wgu, wd = make_weights(E_, H, F, "cuda")
    x, ids, w = _inputs(T, k=k, experts=E_, skew=skew, dtype=dtype)
    checked = hare.moe(x, ids, w, wgu, wd, check_ids=True)
    unchecked = hare.moe(x, ids, w, wgu, wd, check_ids=False)
    hg.check_errors()
    assert torch.equal(checked, unchecked)
    assert torch.isfinite(checked.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_layout_converts_every_routing_weight_dtype(weights, dtype):
    wgu, wd = weights
    x, ids, w = _inputs(45)
    w = w.to(dtype)
    _good_call(x, ids, w, wgu, wd)
    _good_call(x, ids, w[:, :].t().contiguous().t(), wgu, wd)  # non-contiguous weights


def test_a_captured_graph_checks_each_replay(weights):
    """check_ids=True inside a CUDA graph: good replays are right; a replay on bad ids gives NaN and the next eager
    call raises (nothing is read on the host while capturing or replaying); good ids again replay right."""
    wgu, wd = weights
    x, ids, w = _inputs(64)
    eager = _good_call(x, ids, w, wgu, wd)  # loads the kernels before capture
    graph, sids, out = _capture(x, ids, w, wgu, wd)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    bad = ids.clone()
    bad[7, 1] = bad[7, 0]
    sids.copy_(bad)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(out.float()).all()
    with pytest.raises(InvalidArgumentError, match="token 7 is routed to expert"):
        hare.moe(x, ids, w, wgu, wd)
    sids.copy_(ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    hg.check_errors()


def test_a_pending_error_does_not_break_a_capture_and_is_raised_after_it(weights):
    wgu, wd = weights
    x, ids, w = _inputs(16)
    _good_call(x, ids, w, wgu, wd)
    bad = ids.clone()
    bad[0, 0] = -2
    hare.moe(x, bad, w, wgu, wd)
    torch.cuda.synchronize()  # the record is there before the capture starts
    graph, _, out = _capture(x, ids, w, wgu, wd, warm_up=False)  # an eager warm-up would raise it
    with pytest.raises(InvalidArgumentError, match="token 0, slot 0: expert id -2"):
        hare.moe(x, ids, w, wgu, wd)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, ids, w, wgu, wd)) < TOL


def test_fused_moe_checks_only_when_told(weights):
    wgu, wd = weights
    x, ids, w = _inputs(32)
    bad = ids.clone()
    bad[3, 0] = E
    out = hg.fused_moe(x, bad, w, wgu, wd)  # unchecked: clamped, finite
    hg.check_errors()
    assert torch.isfinite(out.float()).all()
    out = hg.fused_moe(x, bad, w, wgu, wd, check_ids=True)
    with pytest.raises(InvalidArgumentError, match="token 3, slot 0"):
        hg.check_errors()
    assert torch.isnan(out.float()).all()
