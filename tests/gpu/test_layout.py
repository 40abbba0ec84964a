import pytest
import torch

from hare.gpu import build_layout
from hare.routing import route

from .moe_cases import make_routing

pytestmark = pytest.mark.gpu

FIELDS = ("counts", "offsets", "gather_index", "row_assignment", "assignment_row", "block_expert", "block_start",
          "block_height", "num_blocks")


def _check_equal(ids, E, block):
    ref = route(ids.cpu(), E, block)
    got = build_layout(ids, E, block)
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == torch.int32, f
        assert tuple(a.shape) == tuple(b.shape), f
        assert torch.equal(a.cpu(), b), f"{f} differs"
    assert got.num_tokens == ref.num_tokens and got.top_k == ref.top_k and got.block == ref.block


@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 8, 2), (1, 128, 8), (7, 64, 6), (129, 60, 4), (1000, 8, 2),
                                   (4097, 128, 8), (16384, 128, 8), (16384, 8, 2), (300, 1, 1), (50, 256, 3)])
@pytest.mark.parametrize("block", [128, 16, 100])
def test_layout_matches_route(T, E, k, block):
    ids, _ = make_routing(T, E, k, "cuda", skew=1.2 if T % 2 else 0.0)
    _check_equal(ids, E, block)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_layout_dtypes_and_one_expert(dtype):
    ids, _ = make_routing(777, 16, 1, "cuda", only_expert=5)
    _check_equal(ids.to(dtype), 16, 128)
    ids, _ = make_routing(500, 64, 4, "cuda", skew=2.0)
    _check_equal(ids.to(dtype), 64, 32)


def test_layout_repeat_and_graph():
    ids, _ = make_routing(3000, 64, 6, "cuda", skew=1.0)
    a = build_layout(ids, 64, 128)
    g = torch.cuda.CUDAGraph()
    static_ids = ids.clone()
    with torch.cuda.graph(g):
        b = build_layout(static_ids, 64, 128)
    ids2, _ = make_routing(3000, 64, 6, "cuda", skew=0.0)
    static_ids.copy_(ids2)
    g.replay()
    ref = route(ids2.cpu(), 64, 128)
    for f in FIELDS:
        assert torch.equal(getattr(b, f).cpu(), getattr(ref, f)), f
    static_ids.copy_(ids)
    g.replay()
    for f in FIELDS:
        assert torch.equal(getattr(b, f), getattr(a, f)), f
