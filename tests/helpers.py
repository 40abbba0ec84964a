"""Independent, deliberately naive implementations the library is checked against, and small models to check it on."""

import torch
import torch.nn.functional as F

from hare.metrics import relative_error as rel_error  # noqa: F401 (the tests import it from here)


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


# small sizes every MoE config understands (unknown keys are dropped per model type)
SMALL = dict(hidden_size=32, intermediate_size=24, moe_intermediate_size=24, num_experts=4, num_local_experts=4,
             n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2)
SMALL_MODEL = dict(SMALL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   vocab_size=96, first_k_dense_replace=0, shared_expert_intermediate_size=24, n_shared_experts=1,
                   max_position_embeddings=128, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)


def small_causal_lm(model_type: str, **overrides):
    """A float32 causal LM of ``model_type`` at small sizes (``SMALL_MODEL`` updated by ``overrides``) with real-scale
    expert weights, or None where the small sizes do not make a model this transformers can build and run
    (per-layer attributes, Mamba constraints...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        defaults = type(AutoConfig.for_model(model_type))()
        config = AutoConfig.for_model(model_type, **{k: v for k, v in {**SMALL_MODEL, **overrides}.items()
                                                        if hasattr(defaults, k)})
        with torch.device("meta"):
            if sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) > 3 * 10**7:
                return None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    except Exception:  # noqa: BLE001 - a config these sizes do not fit is not a case of this test
        return None
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ".experts." in name and p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing table is zeros until a checkpoint fills it
            b.copy_(torch.stack([torch.randperm(4, generator=gen)[:b.shape[1]] for _ in range(b.shape[0])]))
    return model


def edit_hare_file(path, version: str | None = None, entry: str | None = None, drop=(), **fields) -> None:
    """Rewrite a Hare file's header in place, tensors unchanged: its format ``version``, and in ``entry`` the
    ``fields`` set and the names in ``drop`` removed (to make older-version or corrupt files)."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    entries = json.loads(meta["entries"])
    if entry is not None:
        entries[entry].update(fields)
        for name in drop:
            del entries[entry][name]
    meta["entries"] = json.dumps(entries)
    if version is not None:
        meta["version"] = version
    save_file(load_file(path), path, metadata=meta)
