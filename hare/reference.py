"""The pure-PyTorch MoE experts: runs on any device and is the reference the GPU kernels are checked against.

It walks the same residual blocked layout as the kernels: each row block of ``route`` multiplies its rows (masked
past the block's height) by its expert's weight, so padding never reaches the output and empty experts cost
nothing. Arithmetic is float32 for half-precision inputs, the input's dtype otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocknm import BlockNM
from .routing import RoutingLayout, route

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
}
_GATHER_BUDGET = 256 * 2**20  # bytes of expert weights gathered for one chunk of row blocks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dense_weight(w: torch.Tensor | BlockNM, dtype: torch.dtype) -> torch.Tensor:
    return (w.to_dense() if isinstance(w, BlockNM) else w).to(dtype)


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


def reference_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str = "silu",
                  layout: RoutingLayout | None = None) -> torch.Tensor:
    """out[t] = Σ_j topk_weights[t, j] · W_down[e] (act(W_gate[e] x_t) ⊙ W_up[e] x_t), e = topk_ids[t, j]."""
    cdt = compute_dtype(x.dtype)
    num_experts = w_gate_up.shape[0]
    layout = layout if layout is not None else route(topk_ids, num_experts)
    num_tokens, top_k = topk_ids.shape
    rows = x.to(cdt)[layout.gather_index.long()]
    gate_up = grouped_linear(rows, dense_weight(w_gate_up, cdt), layout)
    ffn = gate_up.shape[1] // 2
    hidden = ACTIVATIONS[activation](gate_up[:, :ffn]) * gate_up[:, ffn:]
    y = grouped_linear(hidden, dense_weight(w_down, cdt), layout)
    y = y[layout.assignment_row.long()].view(num_tokens, top_k, x.shape[1])
    return (topk_weights.to(cdt)[..., None] * y).sum(1).to(x.dtype)
