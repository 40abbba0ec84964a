"""The pure-PyTorch MoE experts: runs on any device and is the reference the GPU kernels are checked against.

It walks the same residual blocked layout as the kernels: each row block of ``route`` multiplies its rows (masked
past the block's height) by its expert's weight, so padding never reaches the output and empty experts cost
nothing. Arithmetic is float32 for half-precision inputs, the input's dtype otherwise.

Weights are expanded to dense in the compute dtype only for the experts that have rows. On the CPU the expansion
is kept (per weight, until its storage changes or is freed) within ``HARE_REFERENCE_CACHE_MB`` (default: a
quarter of the machine's memory), so a Block N:M model runs about as fast as its dense one after the first call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .activations import glu
from .blocknm import BlockNM
from .routing import RoutingLayout, route

_GATHER_BUDGET = 256 * 2**20  # bytes of expert weights gathered for one chunk of row blocks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dense_weight(w: torch.Tensor | BlockNM, dtype: torch.dtype) -> torch.Tensor:
    return (w.to_dense() if isinstance(w, BlockNM) else w).to(dtype)


def _cache_budget() -> int:
    if "HARE_REFERENCE_CACHE_MB" in os.environ:
        return int(os.environ["HARE_REFERENCE_CACHE_MB"]) * 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class _Expansion:
    key: tuple  # compute dtype and the versions of the weight's storage when expanded
    dense: torch.Tensor  # (E, N, K) in the compute dtype; experts not yet ``done`` are zeros
    done: torch.Tensor  # (E,) bool


_expansions = WeakTensorKeyDictionary()  # a weight's (first) storage tensor -> its _Expansion


def expert_weight(w: torch.Tensor | BlockNM, dtype: torch.dtype, counts: torch.Tensor) -> torch.Tensor:
    """The stacked weight (E, N, K) as dense ``dtype``, exact for every expert with rows (``counts`` > 0); the
    others are not expanded. On the CPU the expansion is reused by later calls, within the cache budget."""
    if isinstance(w, torch.Tensor) and (w.dtype == dtype or w.requires_grad):
        return w.to(dtype)  # no copy when the dtype matches; a weight being trained is never cached
    storage = (w.values, w.meta, w.block_idx) if isinstance(w, BlockNM) else (w,)
    key = (dtype, tuple(t._version for t in storage))
    entry = _expansions.get(storage[0])
    if entry is None or entry.key != key or entry.dense.shape != w.shape:
        entry = None
        nbytes = w.shape.numel() * dtype.itemsize
        cached = sum(e.dense.numel() * e.dense.element_size() for e in _expansions.values())
        if storage[0].device.type == "cpu" and cached + nbytes <= _cache_budget():
            entry = _Expansion(key, torch.zeros(w.shape, dtype=dtype), torch.zeros(w.shape[0], dtype=torch.bool))
            _expansions[storage[0]] = entry
    dense = entry.dense if entry is not None else torch.zeros(w.shape, dtype=dtype, device=storage[0].device)
    need = counts > 0 if entry is None else (counts > 0) & ~entry.done
    ids = need.nonzero().flatten()
    if ids.numel():
        if isinstance(w, BlockNM):
            part = BlockNM(w.values[ids], w.meta[ids], w.block_idx[ids], shape=(ids.numel(), *w.shape[1:]),
                           **w.params)
            dense[ids] = part.to_dense().to(dtype)
        else:
            dense[ids] = w[ids].to(dtype)
        if entry is not None:
            entry.done[ids] = True
    return dense


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, layout: RoutingLayout) -> torch.Tensor:
    """rows (R, K) sorted by expert, weight (E, N, K) -> (R, N): each row times its expert's weight, block by block."""
    num_rows, n = rows.shape[0], weight.shape[1]
    out = rows.new_zeros(num_rows + 1, n)  # row R absorbs the masked rows of residual and unused blocks
    lane = torch.arange(layout.block, device=rows.device)
    chunk = max(1, _GATHER_BUDGET // max(1, weight[0].numel() * weight.element_size()))
    for first in range(0, layout.max_blocks, chunk):
        start = layout.block_start[first:first + chunk, None].long() + lane
        valid = lane < layout.block_height[first:first + chunk, None]
        src = torch.where(valid, start, 0).clamp(max=max(num_rows - 1, 0))
        xb = rows[src] * valid[..., None] if num_rows else rows.new_zeros(*src.shape, rows.shape[1])
        wb = weight[layout.block_expert[first:first + chunk].clamp(min=0).long()]
        out[torch.where(valid, start, num_rows)] = torch.bmm(xb, wb.transpose(1, 2))
    return out[:num_rows]


def expert_of_rows(topk_ids: torch.Tensor, layout: RoutingLayout) -> torch.Tensor:
    """(R,) the expert of each row of the layout, in its row order."""
    return topk_ids.reshape(-1)[layout.row_assignment.long()].long()


def expert_hidden(rows, w_gate_up, activation: str, layout: RoutingLayout, gate_up_bias=None, expert_of_row=None):
    """The hidden state glu(W_gate_up[e] x + b[e]) of rows sorted by expert (float32 or finer ``rows``)."""
    gate_up = grouped_linear(rows, expert_weight(w_gate_up, rows.dtype, layout.counts), layout)
    if gate_up_bias is not None:
        gate_up = gate_up + gate_up_bias.to(rows.dtype)[expert_of_row]
    return glu(activation, gate_up)


def reference_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str = "silu",
                  layout: RoutingLayout | None = None, gate_up_bias=None, down_bias=None) -> torch.Tensor:
    """out[t] = Σ_j topk_weights[t, j] · (W_down[e] glu(W_gate_up[e] x_t + b_gate_up[e]) + b_down[e]),
    e = topk_ids[t, j]; glu(gate, up) = act(gate) ⊙ up unless ``activation`` names another (``glu_function``); biases
    (E, 2·ffn) and (E, hidden) are optional."""
    cdt = compute_dtype(x.dtype)
    num_experts = w_gate_up.shape[0]
    layout = layout if layout is not None else route(topk_ids, num_experts)
    num_tokens, top_k = topk_ids.shape
    rows = x.to(cdt)[layout.gather_index.long()]
    expert = expert_of_rows(topk_ids, layout) if gate_up_bias is not None or down_bias is not None else None
    hidden = expert_hidden(rows, w_gate_up, activation, layout, gate_up_bias, expert)
    y = grouped_linear(hidden, expert_weight(w_down, cdt, layout.counts), layout)
    if down_bias is not None:
        y = y + down_bias.to(cdt)[expert]
    y = y[layout.assignment_row.long()].view(num_tokens, top_k, x.shape[1])
    return (topk_weights.to(cdt)[..., None] * y).sum(1).to(x.dtype)
