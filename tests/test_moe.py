import pytest
import torch

import hare

from helpers import naive_moe, random_topk, rel_error


def make_case(t, e, k, hidden, ffn, gen, dtype=torch.float64, skew=0.0):
    x = torch.randn(t, hidden, generator=gen, dtype=torch.float64).to(dtype)
    ids = random_topk(t, e, k, gen, skew=skew)
    w = torch.rand(t, k, generator=gen, dtype=torch.float64).to(dtype)
    wg = (torch.randn(e, 2 * ffn, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).to(dtype)
    wd = (torch.randn(e, hidden, ffn, generator=gen, dtype=torch.float64) / ffn**0.5).to(dtype)
    return x, ids, w, wg, wd


@pytest.mark.parametrize("k", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_dense_matches_naive_loop(k, activation, gen):
    args = make_case(150, 9, k, 48, 40, gen, skew=1.0)
    out = hare.moe(*args, activation=activation)
    assert out.dtype == torch.float64 and out.shape == (150, 48)
    assert rel_error(out, naive_moe(*args, activation=activation)) < 1e-12


@pytest.mark.parametrize("bn,bm,bw", [(1, 1, 16), (1, 2, 16), (1, 5, 32), (1, 10, 16)])
def test_blocknm_matches_naive_loop_on_dense_equivalent(bn, bm, bw, gen):
    x, ids, w, wg, wd = make_case(70, 6, 2, 160, 192, gen)
    sg = hare.sparsify(wg, bn=bn, bm=bm, bw=bw, dtype=torch.float64)
    sd = hare.sparsify(wd, bn=bn, bm=bm, bw=bw, dtype=torch.float64)
    out = hare.moe(x, ids, w, sg, sd)
    assert rel_error(out, naive_moe(x, ids, w, sg.to_dense(), sd.to_dense())) < 1e-12
    mixed = hare.moe(x, ids, w, sg, wd)  # one sparse, one dense
    assert rel_error(mixed, naive_moe(x, ids, w, sg.to_dense(), wd)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs(dtype, gen):
    args = make_case(200, 8, 2, 64, 96, gen)
    out = hare.moe(*(a if a.dtype == torch.int64 else a.to(dtype) for a in args))
    assert out.dtype == dtype
    assert rel_error(out, naive_moe(*args)) < 1e-2


@pytest.mark.parametrize("t,e,k,skew", [(1, 8, 2, 0.0), (0, 4, 2, 0.0), (300, 64, 1, 0.0), (257, 16, 4, 6.0)])
def test_edge_cases(t, e, k, skew, gen):
    args = make_case(t, e, k, 32, 24, gen, skew=skew)
    out = hare.moe(*args)
    assert out.shape == (t, 32)
    if t:
        assert rel_error(out, naive_moe(*args)) < 1e-12


def test_all_tokens_to_one_expert_and_empty_experts(gen):
    x, _, w, wg, wd = make_case(260, 5, 1, 32, 24, gen)
    ids = torch.full((260, 1), 3)
    assert rel_error(hare.moe(x, ids, w, wg, wd), naive_moe(x, ids, w, wg, wd)) < 1e-12


def test_output_rows_of_unrouted_weights_are_zero(gen):
    x, ids, w, wg, wd = make_case(10, 4, 2, 32, 24, gen)
    w[3] = 0
    assert torch.count_nonzero(hare.moe(x, ids, w, wg, wd)[3]) == 0


def _bad(gen, **change):
    x, ids, w, wg, wd = make_case(6, 4, 2, 32, 24, gen)
    args = dict(x=x, topk_ids=ids, topk_weights=w, w_gate_up=wg, w_down=wd)
    args.update({k: (v(args) if callable(v) else v) for k, v in change.items()})
    return args


@pytest.mark.parametrize("change,match", [
    (dict(x=lambda a: a["x"].long()), "x: expected a floating"),
    (dict(x=lambda a: a["x"][None]), "x: expected 2"),
    (dict(topk_ids=lambda a: a["topk_ids"].float()), "topk_ids: expected an integer"),
    (dict(topk_ids=lambda a: a["topk_ids"][:5]), "topk_ids: expected 6 rows"),
    (dict(topk_ids=lambda a: a["topk_ids"] + 4), r"topk_ids: expert ids must lie in \[0, 4\)"),
    (dict(topk_ids=lambda a: a["topk_ids"][:, :1].repeat(1, 2)), "twice"),
    (dict(topk_weights=lambda a: a["topk_weights"][:, :1]), "topk_weights: expected"),
    (dict(w_gate_up=lambda a: a["w_gate_up"][:, :, :16]), "w_gate_up: expected shape"),
    (dict(w_gate_up=lambda a: a["w_gate_up"][:, :47]), "w_gate_up: expected an even"),
    (dict(w_down=lambda a: a["w_down"][:3]), r"w_down: expected shape \(4, 32, 24\)"),
    (dict(w_down=lambda a: a["w_down"][:, :, :20]), "w_down: expected shape"),
    (dict(w_down=lambda a: a["w_down"].float()), "w_down: dtype"),
    (dict(w_down=lambda a: a["w_down"][0]), "w_down: expected 3"),
    (dict(w_gate_up=lambda a: hare.sparsify(a["w_gate_up"][0], bn=1, bm=1)), "stacked"),
    (dict(topk_weights=lambda a: a["topk_weights"].to("meta")), "one device"),
])
def test_moe_errors(change, match, gen):
    with pytest.raises(hare.InvalidArgumentError, match=match):
        hare.moe(**_bad(gen, **change))


@pytest.mark.parametrize("activation", ["relu", "clamped-silu", "clamped-silu:limit", "gpt-oss:beta=2",
                                        "gpt-oss:limit=x", 3])
def test_moe_rejects_unknown_activation(activation, gen):
    with pytest.raises(hare.InvalidArgumentError, match="activation"):
        hare.moe(**_bad(gen), activation=activation)


@pytest.mark.parametrize("activation", ["gpt-oss", "gpt-oss:alpha=1.2,limit=2.5", "clamped-silu:limit=1.5", "silu"])
@pytest.mark.parametrize("biases", [(True, True), (True, False), (False, True)])
def test_clamped_units_and_expert_biases_match_naive_loop(activation, biases, gen):
    """Inputs scaled so that many gate/up values pass the clamps; biases are added before the routing weight."""
    x, ids, w, wg, wd = make_case(70, 6, 3, 32, 24, gen)
    x = x * 4
    bg = torch.randn(6, 48, generator=gen, dtype=torch.float64) if biases[0] else None
    bd = torch.randn(6, 32, generator=gen, dtype=torch.float64) if biases[1] else None
    out = hare.moe(x, ids, w, wg, wd, activation=activation, gate_up_bias=bg, down_bias=bd)
    assert rel_error(out, naive_moe(x, ids, w, wg, wd, activation, bg, bd)) < 1e-12
    sparse = hare.moe(x, ids, w, hare.sparsify(wg, bn=1, bm=2), wd, activation=activation, gate_up_bias=bg,
                      down_bias=bd)
    assert rel_error(sparse, naive_moe(x, ids, w, hare.sparsify(wg, bn=1, bm=2).to_dense(), wd, activation, bg,
                                       bd)) < 1e-12


@pytest.mark.parametrize("name,bias,match", [
    ("gate_up_bias", torch.zeros(4, 47), r"gate_up_bias: expected shape \(4, 48\)"),
    ("down_bias", torch.zeros(4, 32, 1), "down_bias: expected 2"),
    ("down_bias", torch.zeros(4, 32, dtype=torch.long), "floating"),
    ("down_bias", torch.zeros(4, 32, device="meta"), "one device"),
])
def test_moe_refuses_bad_biases(name, bias, match, gen):
    with pytest.raises(hare.InvalidArgumentError, match=match):
        hare.moe(**_bad(gen), **{name: bias})


def test_check_ids_false_skips_only_the_id_check(gen):
    args = _bad(gen)
    ok = hare.moe(**args, check_ids=False)
    assert torch.equal(ok, hare.moe(**args))
    with pytest.raises(hare.InvalidArgumentError, match="topk_weights"):
        hare.moe(**_bad(gen, topk_weights=lambda a: a["topk_weights"][:, :1]), check_ids=False)
