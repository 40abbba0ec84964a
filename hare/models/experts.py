"""``HareExperts``: the drop-in experts module that ``hare.patch`` puts in place of a transformers one.

It takes the call transformers makes, ``experts(hidden_states, top_k_index, top_k_weights)``, and answers with
``hare.moe``. Dense weights are parameters in Hare's layout; Block N:M weights are buffers (``*_values``,
``*_meta``, ``*_block_idx``) so that ``model.to(device)`` and ``state_dict`` carry them like any other tensor.
Expert biases (GPT-OSS) stay dense parameters, ``gate_up_bias`` (E, 2F) and ``down_bias`` (E, H), or None.
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocknm import BlockNM
from ..distributed import ep_moe
from ..moe import moe

_PARTS = ("values", "meta", "block_idx")


class HareExperts(nn.Module):
    """With ``group`` set, the weights are this rank's shard of the experts and ``forward`` runs ``hare.ep_moe``."""

    def __init__(self, w_gate_up: torch.Tensor | BlockNM, w_down: torch.Tensor | BlockNM, activation: str,
                 group=None, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None):
        super().__init__()
        self.activation = activation
        self.group = group
        self.check_ids = False  # ids come from the model's own top-k router: skip hare.moe's host-side check
        self.num_experts, two_ffn, self.hidden_dim = w_gate_up.shape
        self.intermediate_dim = two_ffn // 2
        self.sparsity = None
        self.layout = {}  # per BlockNM weight: its panel layout, hare.sparsify's joint and halves
        for name, w in (("gate_up", w_gate_up), ("down", w_down)):
            if isinstance(w, BlockNM):
                self.sparsity = {"bn": w.bn, "bm": w.bm, "bw": w.bw}
                self.layout[name] = {"joint": w.joint, "halves": w.halves}
                for part in _PARTS:
                    self.register_buffer(f"{name}_{part}", getattr(w, part))
            else:
                self.register_parameter(f"{name}_proj", nn.Parameter(w.detach(), requires_grad=False))
        for name, b in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
            self.register_parameter(name, None if b is None else nn.Parameter(b.detach(), requires_grad=False))

    @property
    def sparse(self) -> bool:
        return self.sparsity is not None

    def weight(self, name: str) -> torch.Tensor | BlockNM:
        """The ``gate_up`` or ``down`` weight as ``hare.moe`` takes it."""
        if not self.sparse:
            return getattr(self, f"{name}_proj")
        shape = ((self.num_experts, 2 * self.intermediate_dim, self.hidden_dim) if name == "gate_up"
                 else (self.num_experts, self.hidden_dim, self.intermediate_dim))
        return BlockNM(*(getattr(self, f"{name}_{p}") for p in _PARTS), shape=shape, **self.sparsity,
                       **self.layout[name])

    def blocknm_weights(self) -> dict[str, BlockNM | torch.Tensor]:
        """What a Hare checkpoint file holds for this module: both weights and the biases it has."""
        weights = {name: self.weight(name) for name in ("gate_up", "down")}
        return {**weights, **{name: b for name, b in self.biases().items() if b is not None}}

    def biases(self) -> dict[str, torch.Tensor | None]:
        return {"gate_up_bias": self.gate_up_bias, "down_bias": self.down_bias}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        ids, weights = top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1)
        if self.group is not None:
            out = ep_moe(x, ids, weights, self.weight("gate_up"), self.weight("down"), self.group, self.activation,
                         self.gate_up_bias, self.down_bias)
        else:
            out = moe(x, ids, weights, self.weight("gate_up"), self.weight("down"), self.activation,
                      check_ids=self.check_ids, gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)
        return out.view(hidden_states.shape)

    def extra_repr(self) -> str:
        kind = "dense" if not self.sparse else "{bn}:{bm} bw{bw}".format(**self.sparsity)
        kind += " joint panels" if any(lay["joint"] for lay in self.layout.values()) else ""
        shard = "" if self.group is None else " (this rank's shard)"
        bias = ", biases" if self.gate_up_bias is not None or self.down_bias is not None else ""
        return (f"experts={self.num_experts}{shard}, hidden={self.hidden_dim}, ffn={self.intermediate_dim}, "
                f"activation={self.activation}, weights={kind}{bias}")
