import pytest
import torch

import hare
from hare.calibration import expert_input_grams, expert_input_norms
from hare.reconstruct import reconstruct
from helpers import random_topk, rel_error
from test_blocknm import check_structure


def naive_obs(w: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT's update with a fixed mask, one column at a time in float64: each pruned weight's error spread over
    the columns right of it with the row of the upper Cholesky factor of the damped inverse Hessian."""
    w = w.double().clone()
    n = gram.shape[-1]
    h = gram.double() + damp * gram.double().diagonal().mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    for j in range(n):
        err = w[:, j] * (~keep[:, j]) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None]
    return w


def planted(gen, experts=2, out=200, inp=320, tokens=1024, rank=24):
    """Inputs that lie near a low-dimensional subspace (as real activations do), where compensation pays."""
    basis = torch.randn(experts, rank, inp, generator=gen)
    x = torch.randn(experts, tokens, rank, generator=gen) @ basis + 0.05 * torch.randn(experts, tokens, inp, generator=gen)
    return x, x.transpose(1, 2) @ x, torch.randn(experts, out, inp, generator=gen)


def output_error(x, w, w_new):
    return rel_error(x @ w_new.transpose(1, 2), x @ w.transpose(1, 2))


@pytest.mark.parametrize("bn,bm,bw", [(1, 2, 16), (1, 5, 16), (1, 10, 32), (1, 1, 64), (2, 5, 16)])
def test_to_dense_is_the_column_by_column_update_with_its_mask(bn, bm, bw, gen):
    # in = 320 and out = 200: a partial window (1:10 at bw 32), a partial panel, chunks not dividing the blocks
    x, gram, w = planted(gen)
    sparse, fallback = reconstruct(w, gram, bn=bn, bm=bm, bw=bw, refine=0, dtype=torch.float32)
    assert fallback == []
    keep = sparse.mask()
    check_structure(keep, bn, bm, bw)
    sparse.check()
    dense = sparse.to_dense()
    assert bool((dense[~keep] == 0).all())
    for e in range(w.shape[0]):
        ref = naive_obs(w[e], keep[e], gram[e])
        assert rel_error(dense[e], ref) < 1e-4


def test_refinement_reaches_the_least_squares_optimum_of_its_mask(gen):
    x, gram, w = planted(gen, experts=1, out=8, inp=64, rank=40)
    sparse, _ = reconstruct(w, gram, bn=1, bm=2, refine=64, dtype=torch.float64)
    keep = sparse.mask()[0]
    h = gram[0].double() + 0.01 * gram[0].double().diagonal().mean() * torch.eye(64, dtype=torch.float64)
    w0, best = w[0].double(), torch.zeros(8, 64, dtype=torch.float64)
    for r in range(8):  # kept weights: w_K + H_KK⁻¹ H_KP w_P (the pruned ones are 0)
        k = keep[r]
        best[r, k] = w0[r, k] + torch.linalg.solve(h[k][:, k], h[k][:, ~k] @ w0[r, ~k])
    assert rel_error(sparse.to_dense()[0], best) < 1e-6


@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_update_reduces_the_output_error_of_its_mask(density, gen):
    bn, bm = hare.blocknm.DENSITIES[density]
    x, gram, w = planted(gen)
    sparse, _ = reconstruct(w, gram, bn=bn, bm=bm, bw=16, dtype=torch.float32)
    same_mask = w * sparse.mask()
    activation = hare.sparsify(w, bn=bn, bm=bm, score=w.abs() * gram.diagonal(dim1=-2, dim2=-1).sqrt()[:, None],
                               dtype=torch.float32).to_dense()
    sequential, _ = reconstruct(w, gram, bn=bn, bm=bm, bw=16, refine=0, dtype=torch.float32)
    err = output_error(x, w, sparse.to_dense())
    assert output_error(x, w, sequential.to_dense()) < 0.9 * output_error(x, w, same_mask)
    assert err < 0.5 * output_error(x, w, sequential.to_dense())
    assert err < 0.5 * output_error(x, w, same_mask) and err < 0.5 * output_error(x, w, activation)


def test_bf16_values_and_a_single_matrix(gen):
    x, gram, w = planted(gen, experts=1)
    sparse, _ = reconstruct(w[0], gram[0], bn=1, bm=2)
    assert sparse.shape == w[0].shape and sparse.dtype == torch.bfloat16
    ref, _ = reconstruct(w, gram, bn=1, bm=2, dtype=torch.float32)
    assert torch.equal(sparse.to_dense(), ref.to_dense()[0].bfloat16())


def test_experts_with_few_tokens_fall_back_to_activation_aware(gen):
    x, gram, w = planted(gen, experts=3)
    counts = torch.tensor([500, 3, 500])
    sparse, fallback = reconstruct(w, gram, bn=1, bm=2, counts=counts, min_tokens=10, dtype=torch.float32)
    assert fallback == [1]
    score = w[1].abs() * gram[1].diagonal().sqrt()
    assert torch.equal(sparse.to_dense()[1], hare.sparsify(w[1], bn=1, bm=2, score=score, dtype=torch.float32).to_dense())
    full, _ = reconstruct(w, gram, bn=1, bm=2, dtype=torch.float32)
    assert torch.equal(sparse.to_dense()[[0, 2]], full.to_dense()[[0, 2]])  # experts are pruned independently


def test_bad_inputs(gen):
    _, gram, w = planted(gen, experts=2, out=64, inp=64)
    bad = {
        "gram: expected shape": dict(gram=gram[:, :32, :32]),
        "multiple of bw": dict(weight=w[..., :40], gram=gram[:, :40, :40]),
        "finite": dict(gram=gram.clone().index_fill_(1, torch.tensor([0]), float("nan"))),
        "counts": dict(counts=torch.tensor([1, 2, 3])),
        "damp": dict(damp=0.0),
        "refine": dict(refine=-1),
        "bm": dict(bm=0),
    }
    for message, override in bad.items():
        kwargs = dict(weight=w, gram=gram, bn=1, bm=2, bw=16) | override
        with pytest.raises(hare.InvalidArgumentError, match=message):
            reconstruct(**kwargs)


def test_expert_input_grams(gen):
    experts, hidden, ffn, tokens = 4, 32, 48, 300
    x = torch.randn(tokens, hidden, generator=gen)
    ids = random_topk(tokens, experts, 2, gen, skew=1.0)
    w_gate_up = torch.randn(experts, 2 * ffn, hidden, generator=gen) / hidden**0.5
    g_in, g_hidden, counts = expert_input_grams(x, ids, w_gate_up)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=experts).tolist()
    for e in range(experts):
        rows = x[(ids == e).any(1)]
        torch.testing.assert_close(g_in[e], rows.T @ rows, rtol=1e-5, atol=1e-4)
        gate, up = (rows @ w_gate_up[e].T).split(ffn, dim=1)
        h = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(g_hidden[e], h.T @ h, rtol=1e-5, atol=1e-4)
    n_in, n_hidden = expert_input_norms(x, ids, w_gate_up)
    torch.testing.assert_close(g_in.diagonal(dim1=-2, dim2=-1), n_in.square(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_hidden.diagonal(dim1=-2, dim2=-1), n_hidden.square(), rtol=1e-5, atol=1e-4)
