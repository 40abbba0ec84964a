"""Which transformers MoE classes Hare can compute exactly, and how to read their expert weights.

In transformers 5.x a MoE block computes the router scores, top-k, normalisation, grouped top-k, routed scaling
and shared experts itself, then calls an experts module ``experts(hidden_states, top_k_index, top_k_weights)``
that returns Σ_j w_j · down_e(act(gate_e x) ⊙ up_e x). Replacing only that module by ``hare.moe`` keeps every
routing detail exactly as transformers does it. An architecture fits when its experts module computes exactly
that sum: a SwiGLU/GeGLU(tanh) expert without biases, clamps or post-expert norms. Each entry below is checked by
the test suite at a tiny random configuration (dense patch equals the original logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import HareError
from ..reference import ACTIVATIONS


class UnsupportedModelError(HareError, ValueError):
    """The model has no MoE layer that ``hare.patch`` can compute exactly."""


def _stacked(module) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' stacked layout: gate_up_proj (E, 2F, H) with gate rows first, down_proj (E, H, F): Hare's own."""
    return module.gate_up_proj, module.down_proj


def _dbrx(module) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX keeps w1 (gate), v1 (up) and w2 as (E·F, H) matrices; its down projection is x @ w2, i.e. w2ᵀ."""
    mlp, e = module.mlp, module.num_experts
    f, h = mlp.w1.shape[0] // e, mlp.w1.shape[1]
    gate_up = torch.cat([mlp.w1.view(e, f, h), mlp.v1.view(e, f, h)], dim=1)
    return gate_up, mlp.w2.view(e, f, h).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    experts_class: str
    weights: Callable = _stacked        # module -> (w_gate_up (E, 2F, H), w_down (E, H, F)) in Hare's layout
    activation_of: Callable = lambda module: module.act_fn


def _arch(name, model_types, experts_class, **kw) -> Architecture:
    return Architecture(name, tuple(model_types), experts_class, **kw)


ARCHITECTURES = (
    _arch("Mixtral", ["mixtral"], "MixtralExperts"),
    _arch("Qwen2-MoE (Qwen1.5-MoE)", ["qwen2_moe"], "Qwen2MoeExperts"),
    _arch("Qwen3-MoE", ["qwen3_moe"], "Qwen3MoeExperts"),
    _arch("DeepSeek-V2", ["deepseek_v2"], "DeepseekV2Experts"),
    _arch("DeepSeek-V3", ["deepseek_v3"], "DeepseekV3Experts"),
    _arch("OLMoE", ["olmoe"], "OlmoeExperts"),
    _arch("MiniMax", ["minimax"], "MiniMaxExperts"),
    _arch("PhiMoE", ["phimoe"], "PhimoeExperts"),
    _arch("GLM-4-MoE", ["glm4_moe"], "Glm4MoeExperts"),
    _arch("dots.llm1", ["dots1"], "Dots1Experts"),
    _arch("ERNIE-4.5-MoE", ["ernie4_5_moe"], "Ernie4_5_MoeExperts"),
    _arch("HunYuan-MoE-V1", ["hunyuan_v1_moe"], "HunYuanMoEV1Experts"),
    _arch("FlexOlmo", ["flex_olmo"], "FlexOlmoExperts"),
    _arch("GraniteMoE", ["granitemoe"], "GraniteMoeExperts"),
    _arch("DBRX", ["dbrx"], "DbrxExperts", weights=_dbrx, activation_of=lambda m: m.mlp.activation_fn),
)
BY_EXPERTS_CLASS = {a.experts_class: a for a in ARCHITECTURES}

# MoE models of transformers that Hare does not patch, and why (hare.moe cannot compute them exactly).
NOT_SUPPORTED = {
    "gpt_oss": "GPT-OSS experts add biases and use a clamped, α-scaled SwiGLU with (up + 1); hare.moe computes "
               "neither",
    "llama4": "Llama-4 multiplies each expert's input (not its output) by the router score, which hare.moe's "
              "weighted combine does not express",
    "jamba": "not checked: its Mamba layers make a tiny CPU test slow; the experts module is the stacked layout and "
             "would likely fit",
    "minicpm3": "MiniCPM3 in transformers has no MoE layer",
}


def supported_list() -> str:
    return ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ARCHITECTURES)


def activation_name(fn) -> str:
    """Name of Hare's activation that ``fn`` computes, found by evaluating both (robust across transformers'
    activation classes); raises if none matches exactly."""
    probe = torch.linspace(-8, 8, 257, dtype=torch.float64)
    try:
        got = fn(probe)
    except Exception as e:  # an activation that cannot even run on a probe is surely unsupported
        raise UnsupportedModelError(f"expert activation {fn!r} could not be evaluated: {e}") from None
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(got, ref(probe), rtol=1e-12, atol=1e-12):
            return name
    raise UnsupportedModelError(f"expert activation {fn!r} is none of Hare's {sorted(ACTIVATIONS)} "
                                f"(exact GELU: erf; use SiLU or tanh-GELU models)")


def check_plain_experts(module) -> None:
    """The transformers experts decorator records layout flags; Hare computes only the plain gated layout."""
    flags = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}
    for flag, want in flags.items():
        if hasattr(module, flag) and getattr(module, flag) != want:
            raise UnsupportedModelError(f"{type(module).__name__}: {flag}={getattr(module, flag)} is not supported")
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate.__name__ != "_default_apply_gate":
        raise UnsupportedModelError(f"{type(module).__name__} has its own gating function, which hare.moe does not compute")


def architecture_of(module) -> Architecture | None:
    return BY_EXPERTS_CLASS.get(type(module).__name__)


def unsupported_message(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    reason = NOT_SUPPORTED.get(model_type, "no MoE experts module of a supported class was found in it")
    return (f"hare.patch cannot patch this {type(model).__name__} (model_type {model_type!r}): {reason}. "
            f"Supported: {supported_list()}.")

