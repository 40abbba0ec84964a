"""Llama-4's MoE block, routed through Hare.

Llama-4 multiplies each routed expert's *input* by its sigmoid router score, and its experts module runs every
expert on every token (the unchosen ones on zero rows). Hare's experts weight their *outputs*, so the block is
rewritten: each (token, slot) becomes the row x·score routed to its expert with weight 1, which is the same sum,
exactly, with only the chosen experts computed. The router and the shared expert are the model's own modules.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .architectures import BY_EXPERTS_CLASS
from .experts import HareExperts

BLOCK_CLASS = "Llama4TextMoe"


class HareLlama4Moe(nn.Module):
    """Drop-in for ``Llama4TextMoe``: (hidden_states) -> (output, router_logits); ``experts`` is a HareExperts."""

    def __init__(self, block: nn.Module, experts: HareExperts):
        super().__init__()
        self.top_k, self.hidden_dim = block.top_k, block.hidden_dim
        self.router, self.shared_expert, self.experts = block.router, block.shared_expert, experts

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(x)  # scores (T, E): sigmoid of the chosen logits, else 0
        ids = torch.topk(router_logits, self.top_k, dim=1).indices  # the router's own choice
        rows = (x[:, None, :] * router_scores.gather(1, ids)[..., None]).reshape(-1, self.hidden_dim)
        ones = torch.ones(rows.shape[0], 1, dtype=x.dtype, device=x.device)
        routed = self.experts(rows, ids.reshape(-1, 1), ones).view(-1, self.top_k, self.hidden_dim).sum(1)
        out = self.shared_expert(x)
        out.add_(routed.to(out.dtype))
        return out, router_logits


def hare_llama4_blocks(model: nn.Module) -> Iterator[tuple[str, HareLlama4Moe]]:
    """(name, ``HareLlama4Moe`` with dense Hare experts, same outputs) for every Llama-4 MoE block of ``model``, one
    at a time: the caller puts each in place, freeing the old experts, before the next is built."""
    names = [name for name, m in model.named_modules() if type(m).__name__ == BLOCK_CLASS]
    for name in names:
        block = model.get_submodule(name)
        w = BY_EXPERTS_CLASS[type(block.experts).__name__].weights(block.experts)
        yield name, HareLlama4Moe(block, HareExperts(w.gate_up, w.down, w.activation))
