"""MoE experts on PyTorch's grouped GEMM, for CUDA layers the Hopper kernels do not take (expert biases, clamped
gated units: GPT-OSS, DeepSeek-V4).

The reference path expands every expert weight to float32 and multiplies block by block: right, but far too slow
for a model on a GPU. Here the routed rows are sorted by expert once and each projection is one grouped GEMM over
the weights as stored (bf16 operands, float32 accumulation, as transformers' own ``grouped_mm`` experts do); the
biases, the gated unit and the weighted combine run in float32. Block N:M weights are expanded to dense first.
No step reads values back to the host, so the layer captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocknm import BlockNM
from .activations import glu

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
ALIGN = 8  # grouped GEMM operands need 16-byte rows: bf16 dims that are multiples of 8


def available(x: torch.Tensor, w_gate_up, w_down) -> tuple[bool, str]:
    """(True, "") where ``grouped_mm_moe`` runs on these CUDA arguments, else (False, why not)."""
    if _GROUPED_MM is None:
        return False, f"torch {torch.__version__} has no grouped GEMM"
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False, "the grouped GEMM path is for Hopper GPUs (sm_90)"
    dtypes = {x.dtype, *(w.dtype for w in (w_gate_up, w_down))}
    if dtypes != {torch.bfloat16}:
        return False, f"the grouped GEMM path takes bf16 inputs and weights, got {sorted(map(str, dtypes))}"
    hidden, ffn = x.shape[1], w_down.shape[2]
    if hidden % ALIGN or ffn % ALIGN:
        return False, f"hidden {hidden} and ffn {ffn} must be multiples of {ALIGN} for the grouped GEMM"
    return True, ""


def _dense(w) -> torch.Tensor:
    return w.to_dense() if isinstance(w, BlockNM) else w


def grouped_mm_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str = "silu", gate_up_bias=None,
                   down_bias=None) -> torch.Tensor:
    """The same function as ``reference.reference_moe``, on grouped GEMMs."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate_up.shape[0]
    if num_tokens * top_k == 0:
        return x.new_zeros(x.shape)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # assignment (token·k + slot) of each row, rows sorted by expert
    expert = flat[order]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    offsets = counts.cumsum(0).to(torch.int32)  # (bincount would read its maximum back to the host)
    rows = x[order // top_k]
    gate_up = _GROUPED_MM(rows, _dense(w_gate_up).transpose(1, 2), offs=offsets).float()
    if gate_up_bias is not None:
        gate_up = gate_up + gate_up_bias.float()[expert]
    hidden = glu(activation, gate_up).to(x.dtype)
    y = _GROUPED_MM(hidden, _dense(w_down).transpose(1, 2), offs=offsets).float()
    if down_bias is not None:
        y = y + down_bias.float()[expert]
    per_slot = torch.empty_like(y).index_copy_(0, order, y).view(num_tokens, top_k, -1)
    return (topk_weights.float()[..., None] * per_slot).sum(1).to(x.dtype)
