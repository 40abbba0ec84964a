"""Which transformers MoE classes Hare can compute exactly, and how to read their expert weights.

In transformers 5.x a MoE block computes the router scores, top-k, normalisation, grouped top-k, routed scaling
and shared experts itself, then calls an experts module ``experts(hidden_states, top_k_index, top_k_weights)``
that returns Σ_j w_j · (down_e glu(gate_up_e x + b_e) + b'_e). Replacing only that module by ``hare.moe`` keeps
every routing detail exactly as transformers does it.

Most such modules are declared with transformers' ``use_experts_implementation``, which records their layout
(transposed, interleaved gate/up, biases, gated or not, post-expert norm) on the module: Hare reads any of them by
those flags, whatever the class, and finds the gated unit by evaluating the module's own ``_apply_gate`` on a
probe. A module fits when it is gated, has no post-expert norm and its gated unit is one of Hare's
(``activations.glu_function``: SiLU or tanh-GELU gating, clamped SiLU, GPT-OSS's clamped SwiGLU). ``ARCHITECTURES``
lists the models the test suite checks whole at a tiny random configuration (dense patch equals the original
logits); the suite also checks every standard experts class of the installed transformers as a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import HareError
from ..activations import ACTIVATION_FORMS, ACTIVATIONS, GPT_OSS_ALPHA, glu_function


class UnsupportedModelError(HareError, ValueError):
    """The model has no MoE layer that ``hare.patch`` can compute exactly."""


@dataclass
class ExpertWeights:
    """One experts module's weights in Hare's layout: gate_up (E, 2F, H) with the gate rows first, down (E, H, F),
    optional biases (E, 2F) and (E, H), and the name of its gated unit (``activations.glu_function``)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    activation: str
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def is_standard_experts(module) -> bool:
    """A module declared with transformers' ``use_experts_implementation`` (it records the layout flags)."""
    return all(hasattr(module, f) for f in ("has_gate", "has_bias", "is_transposed")) and hasattr(module, "down_proj")


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[g0, u0, g1, u1, ...] along ``dim`` -> [g0, g1, ..., u0, u1, ...]."""
    return torch.cat([t.unflatten(dim, (-1, 2)).select(dim + 1, i) for i in (0, 1)], dim)


def _standard_activation(module) -> str:
    for flag, bad in (("has_gate", False), ("has_post_expert_norm", True)):
        if getattr(module, flag, not bad) == bad:
            raise UnsupportedModelError(f"{type(module).__name__}: {flag}={bad} experts are not computed by hare.moe")
    return glu_name(module)


def _standard(module) -> ExpertWeights:
    """Any standard experts module, by its flags."""
    activation = _standard_activation(module)
    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:  # stored (E, in, out) for x @ W
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate_up_bias = module.gate_up_proj_bias if module.has_bias else None
    if not getattr(module, "is_concatenated", True):
        gate_up = _deinterleave(gate_up, 1)
        gate_up_bias = None if gate_up_bias is None else _deinterleave(gate_up_bias, 1)
    return ExpertWeights(gate_up.contiguous(), down.contiguous(), activation, gate_up_bias,
                         module.down_proj_bias if module.has_bias else None)


def _dbrx(module) -> ExpertWeights:
    """DBRX keeps w1 (gate), v1 (up) and w2 as (E·F, H) matrices; its down projection is x @ w2, i.e. w2ᵀ."""
    mlp, e = module.mlp, module.num_experts
    f, h = mlp.w1.shape[0] // e, mlp.w1.shape[1]
    gate_up = torch.cat([mlp.w1.view(e, f, h), mlp.v1.view(e, f, h)], dim=1)
    return ExpertWeights(gate_up, mlp.w2.view(e, f, h).transpose(1, 2).contiguous(), _dbrx_activation(module))


def _dbrx_activation(module) -> str:
    return activation_name(module.mlp.activation_fn)


def _llama4(module) -> ExpertWeights:
    """Llama-4 keeps gate_up_proj (E, H, 2F) and down_proj (E, F, H) for x @ W, gate columns first."""
    return ExpertWeights(module.gate_up_proj.transpose(1, 2).contiguous(),
                         module.down_proj.transpose(1, 2).contiguous(), _llama4_activation(module))


def _llama4_activation(module) -> str:
    return activation_name(module.act_fn)


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    experts_class: str
    weights: Callable = _standard                   # module -> ExpertWeights
    activation: Callable = _standard_activation     # module -> its gated unit, or UnsupportedModelError (no copies)


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
    _arch("DBRX", ["dbrx"], "DbrxExperts", weights=_dbrx, activation=_dbrx_activation),
    _arch("GPT-OSS", ["gpt_oss"], "GptOssExperts"),
    # its MoE block is rewritten first (``llama4.HareLlama4Moe``): the score scales the expert input
    _arch("Llama-4", ["llama4_text"], "Llama4TextExperts", weights=_llama4, activation=_llama4_activation),
)
BY_EXPERTS_CLASS = {a.experts_class: a for a in ARCHITECTURES}

# MoE models of transformers that Hare does not patch, and why (hare.moe cannot compute them exactly).
NOT_SUPPORTED = {
    "minicpm3": "MiniCPM3 in transformers has no MoE layer",
}


def supported_list() -> str:
    named = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ARCHITECTURES)
    return (f"{named}; and any other experts module in transformers' standard layout (use_experts_implementation) "
            f"that is gated, has no post-expert norm and gates with one of {list(ACTIVATION_FORMS)}")


_PROBE_FFN = 8


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 gate and up values (64, _PROBE_FFN) of both signs from 1e-3 to 1e4: past any clamp a real model
    sets."""
    g = torch.Generator().manual_seed(0)
    magnitude = 10 ** (torch.rand(2, 64, _PROBE_FFN, generator=g, dtype=torch.float64) * 7 - 3)
    sign = torch.randint(0, 2, (2, 64, _PROBE_FFN), generator=g).double() * 2 - 1
    gate, up = sign * magnitude
    return gate, up


def _candidates(module) -> list[str]:
    """Hare's gated units, with the clamp and slope parameters the module carries (any of their usual names)."""
    found = {key: float(getattr(module, attr)) for key, attrs in (("limit", ("limit", "swiglu_limit")),
                                                                 ("alpha", ("alpha", "swiglu_alpha")))
             for attr in attrs if isinstance(getattr(module, attr, None), (int, float))}
    names = [*ACTIVATIONS, "gpt-oss"]
    if "limit" in found:
        names.append(f"clamped-silu:limit={found['limit']!r}")
        names.append(f"gpt-oss:alpha={found.get('alpha', GPT_OSS_ALPHA)!r},limit={found['limit']!r}")
    return names


def _match(what: str, apply_gate, concatenated: bool, candidates) -> str:
    """The first of ``candidates`` whose gated unit equals ``apply_gate`` (which takes gate/up in the module's
    layout) on the probe, to float64 rounding; or, for a gate that computes in float32 itself, to float32's."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        gate, up = (t.to(dtype) for t in _probe())
        laid_out = torch.cat([gate, up], 1) if concatenated else torch.stack([gate, up], -1).flatten(1)
        try:
            got = apply_gate(laid_out)
        except Exception as e:  # a gate that cannot run on a probe is surely not one of ours
            raise UnsupportedModelError(f"{what} could not be evaluated: {e}") from None
        for name in candidates:
            want = glu_function(name)(gate, up)
            if got.shape == want.shape and torch.allclose(got.to(dtype), want, rtol=tol, atol=tol):
                return name
    raise UnsupportedModelError(f"{what} is none of Hare's gated units {list(ACTIVATION_FORMS)} (exact GELU, erf, "
                                "is not one: use SiLU or tanh-GELU models)")


def glu_name(module) -> str:
    """Hare's name (``activations.glu_function``) of the gated unit that the module's ``_apply_gate`` computes."""
    return _match(f"{type(module).__name__}'s gated unit", module._apply_gate,
                  getattr(module, "is_concatenated", True), _candidates(module))


def activation_name(fn) -> str:
    """Hare's name of ``act`` in act(gate) ⊙ up, for an activation function ``fn``."""
    return _match(f"expert activation {fn!r}", lambda t: fn(t[:, :_PROBE_FFN]) * t[:, _PROBE_FFN:], True,
                  list(ACTIVATIONS))


def architecture_of(module) -> Architecture | None:
    """The named architecture of an experts module, a generic one for any other standard experts module, or None."""
    name = type(module).__name__
    if name in BY_EXPERTS_CLASS:
        return BY_EXPERTS_CLASS[name]
    return _arch(name, [], name) if is_standard_experts(module) else None


def unsupported_message(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    reason = NOT_SUPPORTED.get(model_type, "no MoE experts module of a supported class was found in it")
    foreign = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Experts")})
    if foreign:  # e.g. quantized experts (MXFP4 GPT-OSS), which Hare reads only once dequantized
        reason += f" (it has {', '.join(foreign)}; quantized experts, such as MXFP4's, must be loaded dequantized)"
    return (f"hare.patch cannot patch this {type(model).__name__} (model_type {model_type!r}): {reason}. "
            f"Supported: {supported_list()}.")

