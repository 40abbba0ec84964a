"""Independent, deliberately naive implementations the library is checked against."""

import torch
import torch.nn.functional as F


def random_topk(num_tokens: int, num_experts: int, k: int, gen: torch.Generator, skew: float = 0.0):
    """Distinct expert ids per token; ``skew`` > 0 favours low expert ids (Zipf-like)."""
    logits = torch.rand(num_tokens, num_experts, generator=gen).log()
    logits = logits - skew * torch.arange(1, num_experts + 1).float().log()
    return logits.topk(k, dim=1).indices


def naive_glu(activation, gate, up):
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate, approximate="tanh") * up
    family, _, params = activation.partition(":")
    p = {k: float(v) for k, v in (item.split("=") for item in params.split(",") if item)}
    limit = p.get("limit", 7.0)
    g, u = torch.minimum(gate, torch.tensor(limit)), torch.maximum(torch.minimum(up, torch.tensor(limit)),
                                                                  torch.tensor(-limit))
    if family == "clamped-silu":
        return g / (1 + torch.exp(-g)) * u
    assert family == "gpt-oss", activation
    return (u + 1) * g / (1 + torch.exp(-p.get("alpha", 1.702) * g))


def naive_moe(x, ids, weights, w_gate_up, w_down, activation="silu", gate_up_bias=None, down_bias=None):
    """Per-token, per-slot float64 loop."""
    x, weights, w_gate_up, w_down = (t.double() for t in (x, weights, w_gate_up, w_down))
    ffn = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = w_gate_up[e] @ x[t] + (0 if gate_up_bias is None else gate_up_bias[e].double())
            y = w_down[e] @ naive_glu(activation, g[:ffn], g[ffn:])
            out[t] += weights[t, j] * (y + (0 if down_bias is None else down_bias[e].double()))
    return out


def rel_error(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
