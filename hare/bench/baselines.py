"""The baselines the kernel benchmarks time Hare against, on the same routing and weights. Each ``*_fn`` prepares
what the method would keep between calls (outside the timing) and returns the function to time.

* grouped_mm   torch._grouped_mm with the routing it needs (stable argsort, counts, offsets), the gather of x,
               the activation, the weight multiply and the scatter/sum back to tokens
* cublas_loop  one linear pair per touched expert (index lists prepared on the host); with ``cusparselt_weights``
               the same loop over cuSPARSELt 2:4-compressed experts
* padded       every expert rounded up to 128 rows (zero rows), then grouped_mm, like a padded/bmm layout
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from ..blocknm import DENSITIES, sparsify


def _act(name):
    return Fn.silu if name == "silu" else (lambda t: Fn.gelu(t, approximate="tanh"))


def grouped_mm_fn(x, ids, w, wgu_t, wd_t, activation="silu"):
    T, k = ids.shape
    E, F = wd_t.shape[0], wd_t.shape[1]
    H = x.shape[1]
    act = _act(activation)

    def run():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[order // k]
        gu = torch._grouped_mm(xs, wgu_t, offs=offs)
        h = act(gu[:, :F]) * gu[:, F:]
        y = torch._grouped_mm(h, wd_t, offs=offs)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        yy = torch.empty_like(y)
        yy[order] = y
        return yy.view(T, k, H).sum(1)

    return run


def cublas_loop_fn(x, ids, w, wgu, wd, activation="silu"):
    """One linear pair per touched expert; wgu[e] (2F, H) and wd[e] (H, F) may be any weights F.linear takes
    (dense, or the 2:4-compressed tensors of ``cusparselt_weights``)."""
    T, k = ids.shape
    E = len(wgu)
    F = wd[0].shape[1]
    act = _act(activation)
    groups = []
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            groups.append((e, tok, w[tok, slot].to(torch.float32)[:, None]))

    def run():
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        for e, tok, we in groups:
            gu = Fn.linear(x[tok], wgu[e])
            h = act(gu[:, :F]) * gu[:, F:]
            y = Fn.linear(h, wd[e])
            out.index_add_(0, tok, y.float() * we)
        return out.to(torch.bfloat16)

    return run


def padded_fn(x, ids, w, wgu_t, wd_t, activation="silu", pad=128):
    T, k = ids.shape
    E, F = wd_t.shape[0], wd_t.shape[1]
    H = x.shape[1]
    act = _act(activation)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + pad - 1) // pad * pad
    poffs = torch.cumsum(padded, 0)
    pstart = poffs - padded
    sorted_e = flat[order]
    rank = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    prow = pstart[sorted_e] + rank  # padded row of each sorted assignment
    P = int(poffs[-1])
    src = torch.full((P,), T, dtype=torch.int64, device=x.device)  # row T of x_ext is zeros
    src[prow] = order // k
    poffs32 = poffs.to(torch.int32)
    # the padded layout is built once per routing (host sync); the timed part is the padded compute

    def run():
        x_ext = torch.cat([x, x.new_zeros(1, H)])
        xs = x_ext[src]
        gu = torch._grouped_mm(xs, wgu_t, offs=poffs32)
        h = act(gu[:, :F]) * gu[:, F:]
        y = torch._grouped_mm(h, wd_t, offs=poffs32)[prow]
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        yy = torch.empty_like(y)
        yy[order] = y
        return yy.view(T, k, H).sum(1)

    return run


def cusparselt_weights(wgu, wd):
    """Every expert 2:4-pruned (hare.sparsify at 1:1 keeps every block: plain 2:4) and compressed for cuSPARSELt."""
    from torch.sparse import to_sparse_semi_structured

    bn, bm = DENSITIES[0.5]
    return tuple([to_sparse_semi_structured(sparsify(w[e], bn=bn, bm=bm, bw=16).to_dense()) for e in range(len(w))]
                 for w in (wgu, wd))
