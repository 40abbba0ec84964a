"""The reference path's weight expansion: only experts with rows, cached on the CPU, exact, invalidated by writes."""

import torch

import hare
from hare.reference import _expansions, reference_moe

from helpers import random_topk


def _layer(gen, experts=4, hidden=64, ffn=32):
    w_gate_up = hare.sparsify(torch.randn(experts, 2 * ffn, hidden, generator=gen), bn=1, bm=2, dtype=torch.float32)
    w_down = hare.sparsify(torch.randn(experts, hidden, ffn, generator=gen), bn=1, bm=2, dtype=torch.float32)
    return w_gate_up, w_down


def test_only_routed_experts_are_expanded_and_the_expansion_is_reused_exactly(gen):
    w_gate_up, w_down = _layer(gen)
    dense = (w_gate_up.to_dense(), w_down.to_dense())
    x = torch.randn(10, 64, generator=gen)
    weights = torch.rand(10, 2, generator=gen)
    to_0_and_2 = torch.tensor([[0, 2]] * 10)
    out = reference_moe(x, to_0_and_2, weights, w_gate_up, w_down)
    assert torch.equal(out, reference_moe(x, to_0_and_2, weights, *dense))
    assert _expansions[w_gate_up.values].done.tolist() == [True, False, True, False]
    ids = torch.tensor([[1, 3], [2, 1]] * 5)
    for _ in range(2):  # expands experts 1 and 3 once, then reuses them
        assert torch.equal(reference_moe(x, ids, weights, w_gate_up, w_down), reference_moe(x, ids, weights, *dense))
    assert _expansions[w_down.values].done.all()


def test_a_changed_weight_is_expanded_again(gen):
    w_gate_up, w_down = _layer(gen)
    x, weights, ids = torch.randn(6, 64, generator=gen), torch.rand(6, 2, generator=gen), random_topk(6, 4, 2, gen)
    before = reference_moe(x, ids, weights, w_gate_up, w_down)
    w_down.values.mul_(2)  # in place: same tensor, new version
    after = reference_moe(x, ids, weights, w_gate_up, w_down)
    assert torch.equal(after, reference_moe(x, ids, weights, w_gate_up.to_dense(), w_down.to_dense()))
    torch.testing.assert_close(after, 2 * before)


def test_no_cache_beyond_the_budget(gen, monkeypatch):
    monkeypatch.setenv("HARE_REFERENCE_CACHE_MB", "0")
    w_gate_up, w_down = _layer(gen)
    x, weights, ids = torch.randn(6, 64, generator=gen), torch.rand(6, 2, generator=gen), random_topk(6, 4, 2, gen)
    out = reference_moe(x, ids, weights, w_gate_up, w_down)
    assert w_gate_up.values not in _expansions
    assert torch.equal(out, reference_moe(x, ids, weights, w_gate_up.to_dense(), w_down.to_dense()))
