import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hare
from hare.routing import max_blocks

from helpers import random_topk


def check_layout(ids: torch.Tensor, num_experts: int, block: int):
    lay = hare.route(ids, num_experts, block=block)
    t, k = ids.shape
    rows = t * k
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert lay.counts.tolist() == counts.tolist()
    assert lay.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    # every (token, slot) assignment appears exactly once, sorted by expert, stable within an expert
    ra = lay.row_assignment.long()
    assert sorted(ra.tolist()) == list(range(rows))
    assert torch.equal(lay.assignment_row.long()[ra], torch.arange(rows))
    assert torch.equal(lay.gather_index.long(), ra // max(k, 1))
    experts_of_rows = flat[ra]
    assert (experts_of_rows[1:] >= experts_of_rows[:-1]).all()
    same = experts_of_rows[1:] == experts_of_rows[:-1]
    assert (ra[1:][same] > ra[:-1][same]).all()
    # blocks: full ones, then one residual of true height per non-empty expert, none for empty experts
    assert lay.max_blocks == max_blocks(rows, num_experts, block) == lay.block_expert.numel()
    nb = int(lay.num_blocks)
    assert nb == sum(math.ceil(c / block) for c in counts.tolist())
    be, bs, bh = (a.long() for a in (lay.block_expert, lay.block_start, lay.block_height))
    assert (be[nb:] == -1).all() and (bh[nb:] == 0).all() and (bs[nb:] == rows).all()
    assert (bh[:nb] >= 1).all() and (bh[:nb] <= block).all()
    for e in range(num_experts):
        mine = (be[:nb] == e).nonzero().flatten()
        if counts[e] == 0:
            assert mine.numel() == 0
            continue
        heights = bh[mine]
        assert int(heights.sum()) == counts[e]
        assert (heights[:-1] == block).all() and 1 <= heights[-1] <= block
        assert bs[mine].tolist() == [int(lay.offsets[e]) + i * block for i in range(mine.numel())]
        assert (experts_of_rows[bs[mine[0]]:bs[mine[-1]] + heights[-1]] == e).all()
    return lay


@settings(max_examples=60, deadline=None)
@given(t=st.integers(0, 300), k=st.integers(1, 8), extra=st.integers(0, 12), block=st.sampled_from([1, 4, 16, 128]),
       skew=st.sampled_from([0.0, 1.5, 4.0]), seed=st.integers(0, 2**31))
def test_layout_invariants(t, k, extra, block, skew, seed):
    e = k + extra
    ids = random_topk(t, e, k, torch.Generator().manual_seed(seed), skew=skew)
    check_layout(ids, e, block)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_all_tokens_to_one_expert(dtype):
    ids = torch.full((300, 1), 5, dtype=dtype)
    lay = check_layout(ids, 8, 128)
    assert lay.block_height[:3].tolist() == [128, 128, 44]
    assert lay.block_expert[:3].tolist() == [5, 5, 5]


def test_zero_tokens():
    lay = check_layout(torch.zeros(0, 2, dtype=torch.long), 4, 128)
    assert lay.max_blocks == 0 and int(lay.num_blocks) == 0
    assert lay.counts.tolist() == [0, 0, 0, 0]


def test_shapes_depend_on_sizes_only(gen):
    a = hare.route(random_topk(64, 16, 4, gen), 16)
    b = hare.route(torch.arange(4).repeat(64, 1), 16)
    for f in ("counts", "offsets", "gather_index", "block_expert", "block_start", "block_height"):
        assert getattr(a, f).shape == getattr(b, f).shape
        assert getattr(a, f).dtype == torch.int32


def test_route_traces_without_host_sync(gen):
    """fullgraph tracing fails on any .item()/.tolist()/data-dependent shape, which a CUDA graph could not hold."""
    fn = torch.compile(lambda ids: hare.route(ids, 8).block_height, backend="eager", fullgraph=True)
    ids = random_topk(50, 8, 2, gen)
    assert torch.equal(fn(ids), hare.route(ids, 8).block_height)


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[0, 8]]), r"\[0, 8\)"),
    (torch.tensor([[-1, 2]]), r"\[0, 8\)"),
    (torch.tensor([[3, 3]]), "twice"),
    (torch.tensor([0, 1]), "dimensions"),
    (torch.tensor([[0.0, 1.0]]), "integer"),
])
def test_route_errors(ids, match):
    with pytest.raises(hare.InvalidArgumentError, match=match):
        hare.route(ids, 8)


def test_route_rejects_bad_sizes():
    with pytest.raises(hare.InvalidArgumentError, match="num_experts"):
        hare.route(torch.zeros(1, 1, dtype=torch.long), 0)
    with pytest.raises(hare.InvalidArgumentError, match="block"):
        hare.route(torch.zeros(1, 1, dtype=torch.long), 2, block=0)
