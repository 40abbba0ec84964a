"""Inputs and a float32 reference for the GPU tests (and the sanitizer case)."""

from __future__ import annotations

import torch

from hare.activations import glu_function
from hare.bench.shapes import MODEL_SHAPES
from hare.bench.toolkit import make_weights  # noqa: F401 (the GPU tests take their inputs from here)
from hare.metrics import relative_error as rel_err  # noqa: F401

MODELS = MODEL_SHAPES


def make_routing(T, E, k, device, skew: float = 0.0, only_expert: int | None = None, gen=None):
    if only_expert is not None:
        assert k == 1
        ids = torch.full((T, 1), only_expert, dtype=torch.int64, device=device)
    else:
        probs = torch.arange(1, E + 1, device=device, dtype=torch.float32) ** (-skew)
        probs = probs[torch.randperm(E, device=device, generator=gen)]
        ids = torch.multinomial(probs.expand(max(T, 1), E), k, replacement=False, generator=gen)[:T]
    w = torch.softmax(torch.randn(T, k, device=device, generator=gen), dim=-1)
    return ids, w


def make_x(T, H, device, gen=None):
    return torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16)


def reference(x, ids, w, wgu, wd, activation="silu", gate_up_bias=None, down_bias=None):
    """float32 reference on the inputs' device (callers disable TF32): the gated unit `activation` names
    (hare.activations) and optional expert biases, added after each projection."""
    T, H = x.shape
    F = wd.shape[2]
    xf = x.float()
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    unit = glu_function(activation)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = xf[tok] @ wgu[e].float().t()
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e].float()
        y = unit(gu[:, :F], gu[:, F:]) @ wd[e].float().t()
        if down_bias is not None:
            y = y + down_bias[e].float()
        out.index_add_(0, tok, y * w[tok, slot].float()[:, None])
    return out


def poison_allocator(nbytes: int, device):
    """Fill freed allocator memory with NaN so outputs the kernels fail to write show up as NaN."""
    n = max(1, nbytes // 2)
    junk = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device)
    del junk


def check_graph_replay(T, E, k, w_gate_up, w_down, tol, config=None):
    """hare.gpu.fused_moe captured as a CUDA graph replays to the eager result; after new inputs are copied into the
    captured buffers and the output is poisoned, the replay follows them (fp32 reference on the dense equivalent of
    the weights, and bitwise the eager call). Returns the new inputs."""
    import hare
    import hare.gpu as hg

    H = w_gate_up.shape[2]
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in (w_gate_up, w_down)]
    x, (ids, w) = make_x(T, H, "cuda"), make_routing(T, E, k, "cuda")
    eager = hg.fused_moe(x, ids, w, w_gate_up, w_down, config=config)  # also loads the kernels before capture
    sx, sids, sw = x.clone(), ids.clone(), w.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hg.fused_moe(sx, sids, sw, w_gate_up, w_down, config=config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x2, (ids2, w2) = make_x(T, H, "cuda"), make_routing(T, E, k, "cuda")
    sx.copy_(x2), sids.copy_(ids2), sw.copy_(w2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(x2, ids2, w2, *dense)) < tol
    assert torch.equal(out, hg.fused_moe(x2, ids2, w2, w_gate_up, w_down, config=config))
    return x2, ids2, w2
