"""Independent, deliberately naive implementations the library is checked against."""

import torch
import torch.nn.functional as F


def random_topk(num_tokens: int, num_experts: int, k: int, gen: torch.Generator, skew: float = 0.0):
    """Distinct expert ids per token; ``skew`` > 0 favours low expert ids (Zipf-like)."""
    logits = torch.rand(num_tokens, num_experts, generator=gen).log()
    logits = logits - skew * torch.arange(1, num_experts + 1).float().log()
    return logits.topk(k, dim=1).indices


def naive_moe(x, ids, weights, w_gate_up, w_down, activation="silu"):
    """Per-token, per-slot float64 loop."""
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    x, weights, w_gate_up, w_down = (t.double() for t in (x, weights, w_gate_up, w_down))
    ffn = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = w_gate_up[e] @ x[t]
            out[t] += weights[t, j] * (w_down[e] @ (act(g[:ffn]) * g[ffn:]))
    return out


def rel_error(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
