"""Activation statistics for quality-aware pruning.

Magnitude alone ignores how large each input column of an expert is in practice. Running the experts on
calibration tokens gives, per expert, the L2 norm of every input column it sees (x for gate/up, the activated
hidden state for down); ``|w| · ‖x_col‖`` is then the pruning score (Wanda's criterion), passed to ``sparsify``.
The reconstruction pruner (``hare.reconstruct``) needs more: each expert's input Gram matrix XᵀX.
"""

from __future__ import annotations

import torch

from .blocknm import BlockNM
from .reference import compute_dtype, dense_weight, expert_hidden, expert_of_rows
from .routing import route


def _column_norms(rows: torch.Tensor, expert_of_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    sq = rows.new_zeros(num_experts, rows.shape[1])
    sq.index_add_(0, expert_of_row, rows.square())
    return sq.sqrt()


def _expert_inputs(x, topk_ids, w_gate_up, activation, gate_up_bias):
    """The rows each expert sees, sorted by expert: (layout, gate/up inputs (R, hidden), down inputs (R, ffn),
    expert of each row (R,)), in float32 or finer."""
    layout = route(topk_ids, w_gate_up.shape[0])
    rows = x.to(compute_dtype(x.dtype))[layout.gather_index.long()]
    expert_of_row = expert_of_rows(topk_ids, layout)
    hidden = expert_hidden(rows, w_gate_up, activation, layout, gate_up_bias, expert_of_row)
    return layout, rows, hidden, expert_of_row


def expert_input_norms(x: torch.Tensor, topk_ids: torch.Tensor, w_gate_up, activation: str = "silu",
                       gate_up_bias=None):
    """Per-expert input-column norms: (E, hidden) seen by gate/up and (E, ffn) seen by down."""
    num_experts = w_gate_up.shape[0]
    _, rows, hidden, expert_of_row = _expert_inputs(x, topk_ids, w_gate_up, activation, gate_up_bias)
    return _column_norms(rows, expert_of_row, num_experts), _column_norms(hidden, expert_of_row, num_experts)


def expert_input_grams(x: torch.Tensor, topk_ids: torch.Tensor, w_gate_up, activation: str = "silu",
                       gate_up_bias=None):
    """Per-expert input Gram matrices XᵀX (float32): (E, hidden, hidden) of gate/up's inputs, (E, ffn, ffn) of
    down's, and the rows routed to each expert (E,) int64. Their diagonals are the squared column norms."""
    num_experts = w_gate_up.shape[0]
    layout, rows, hidden, _ = _expert_inputs(x, topk_ids, w_gate_up, activation, gate_up_bias)
    grams = [torch.zeros(num_experts, t.shape[1], t.shape[1], dtype=torch.float32, device=t.device)
             for t in (rows, hidden)]
    bounds = layout.offsets.tolist()
    for e in range(num_experts):
        for gram, t in zip(grams, (rows, hidden)):
            part = t[bounds[e]:bounds[e + 1]].float()
            gram[e] = part.T @ part
    return grams[0], grams[1], layout.counts.long()


def activation_score(weight: torch.Tensor | BlockNM, input_norms: torch.Tensor) -> torch.Tensor:
    """|w| · ‖x_col‖ for a stacked weight (E, out, in) and its per-expert input-column norms (E, in)."""
    w = dense_weight(weight, torch.float32) if isinstance(weight, BlockNM) else weight.float()
    return w.abs() * input_norms.float()[:, None, :]
