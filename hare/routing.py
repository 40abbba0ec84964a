"""The padding-free routing layout ("residual blocked coordinates").

Each of the T·k (token, slot) assignments of ``topk_ids`` becomes one *row*. Rows are sorted by expert
(stably, so within an expert they keep token order) and each expert's rows are cut into full blocks of
``block`` rows plus one residual block of its true height. Kernels walk the blocks, gather the rows of ``x``
by ``gather_index`` and mask rows past ``block_height``: no padded copy, no permuted activation tensor, and an
empty expert owns no block at all.

Every tensor's shape depends on (T, k, E, block) alone, never on the routing, so the layout can be built inside
a CUDA graph with no host sync. The block arrays have ``max_blocks = T·k // block + min(E, T·k)`` entries (a
bound on Σ_e ceil(count_e / block)); entries past ``num_blocks`` are unused and marked with ``block_expert = -1``,
``block_start = T·k`` and ``block_height = 0``.

All index tensors are int32 (what the kernels read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_int, check_positive_int, check_topk_ids

DEFAULT_BLOCK = 128


def max_blocks(num_rows: int, num_experts: int, block: int = DEFAULT_BLOCK) -> int:
    """Upper bound on the number of row blocks of any routing of ``num_rows`` rows over ``num_experts``."""
    return num_rows // block + min(num_experts, num_rows)


@dataclass(frozen=True)
class RoutingLayout:
    """Where every routed row lives. ``R = T·k`` rows, ``B = max_blocks(R, E, block)`` block slots.

    counts            (E,)   rows per expert
    offsets           (E+1,) first sorted row of each expert; offsets[E] = R
    gather_index      (R,)   source token of each sorted row
    row_assignment    (R,)   flat (token·k + slot) index of each sorted row
    assignment_row    (R,)   inverse of row_assignment: the sorted row of each (token, slot), for the combine
    block_expert      (B,)   expert of each block, -1 for unused slots
    block_start       (B,)   first sorted row of each block (R for unused slots)
    block_height      (B,)   rows in each block: ``block`` for full blocks, 1..block for a residual, 0 unused
    num_blocks        ()     number of used block slots (a tensor, so no host sync)
    """

    num_tokens: int
    top_k: int
    num_experts: int
    block: int
    counts: torch.Tensor
    offsets: torch.Tensor
    gather_index: torch.Tensor
    row_assignment: torch.Tensor
    assignment_row: torch.Tensor
    block_expert: torch.Tensor
    block_start: torch.Tensor
    block_height: torch.Tensor
    num_blocks: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def route(topk_ids: torch.Tensor, num_experts: int, block: int = DEFAULT_BLOCK) -> RoutingLayout:
    """Build the padding-free layout of ``topk_ids`` (T, k) over ``num_experts`` experts with tensor ops only."""
    check_positive_int("num_experts", num_experts)
    check_positive_int("block", block)
    check_int("topk_ids", topk_ids, ndim=2)
    check_topk_ids(topk_ids, num_experts)
    num_tokens, top_k = topk_ids.shape
    dev = topk_ids.device
    rows = num_tokens * top_k
    flat = topk_ids.reshape(-1).to(torch.int64)

    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

    _, row_assignment = torch.sort(flat, stable=True)
    assignment_row = torch.empty_like(row_assignment)
    assignment_row[row_assignment] = torch.arange(rows, device=dev)

    blocks_per_expert = (counts + block - 1) // block
    block_end = torch.cumsum(blocks_per_expert, 0)  # one past each expert's last block
    num_blocks = block_end[-1]
    slots = max_blocks(rows, num_experts, block)
    slot = torch.arange(slots, device=dev)
    expert = torch.searchsorted(block_end, slot, right=True).clamp_(max=num_experts - 1)
    local = slot - (block_end[expert] - blocks_per_expert[expert])
    used = slot < num_blocks
    start = offsets[expert] + local * block
    height = (counts[expert] - local * block).clamp(max=block)

    i32 = torch.int32
    return RoutingLayout(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=num_experts,
        block=block,
        counts=counts.to(i32),
        offsets=offsets.to(i32),
        gather_index=(row_assignment // top_k).to(i32),
        row_assignment=row_assignment.to(i32),
        assignment_row=assignment_row.to(i32),
        block_expert=torch.where(used, expert, -1).to(i32),
        block_start=torch.where(used, start, rows).to(i32),
        block_height=torch.where(used, height, 0).to(i32),
        num_blocks=num_blocks.to(i32),
    )
