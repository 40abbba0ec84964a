"""The gated units of MoE experts, hidden = f(gate, up), by name: the registry every path reads.

``glu_function(name)`` gives the unit for any name of ``ACTIVATION_FORMS``; the reference path and the grouped
GEMM path compute every one of them, and so do the Hopper kernels (``hare.gpu.FUSED_ACTIVATIONS``, parameters
from ``glu_parameters``).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

ACTIVATIONS = {  # act in act(gate) ⊙ up, the gated experts of most MoE models (and the units the Hopper kernels fuse)
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
}
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


def _clamped_silu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU gating with the gate clamped above and up clamped to ±limit (DeepSeek-V4, GLM-5-Next, HY-V4)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


def _gpt_oss(gate: torch.Tensor, up: torch.Tensor, alpha: float = GPT_OSS_ALPHA,
             limit: float = GPT_OSS_LIMIT) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU: (clamp(up, ±limit) + 1) · g·σ(alpha·g), g = min(gate, limit)."""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


# Gated units with parameters, named "family:key=value,...": "clamped-silu:limit=10.0", "gpt-oss" (its defaults)
# or "gpt-oss:alpha=1.702,limit=7.0".
GLU_FAMILIES = {"clamped-silu": (_clamped_silu, ("limit",), ("limit",)),  # (fn, parameters, required)
                "gpt-oss": (_gpt_oss, ("alpha", "limit"), ())}
ACTIVATION_FORMS = (*ACTIVATIONS, "clamped-silu:limit=L", "gpt-oss", "gpt-oss:alpha=A,limit=L")


@functools.lru_cache(maxsize=None)
def glu_parameters(activation: str) -> tuple[str, dict[str, float]]:
    """(family, parameters) of a gated unit named as in ``ACTIVATION_FORMS``, parameters with their defaults
    filled in: "gpt-oss" -> ("gpt-oss", {"alpha": 1.702, "limit": 7.0}), "silu" -> ("silu", {}). ValueError if the
    name names none."""
    if activation in ACTIVATIONS:
        return activation, {}
    family, _, params = activation.partition(":")
    if family not in GLU_FAMILIES:
        raise ValueError(f"unknown activation {activation!r}; expected one of {list(ACTIVATION_FORMS)}")
    fn, names, required = GLU_FAMILIES[family]
    kwargs = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in names:
            raise ValueError(f"activation {activation!r}: {family} takes {', '.join(names)}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ValueError(f"activation {activation!r}: {key} must be a number, got {value!r}") from None
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ValueError(f"activation {activation!r}: {family} needs {', '.join(missing)}")
    defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items() if k in names
                and v.default is not inspect.Parameter.empty}
    return family, {**defaults, **kwargs}


@functools.lru_cache(maxsize=None)
def glu_function(activation: str):
    """The gated unit hidden = f(gate, up) that ``activation`` names (one of ``ACTIVATION_FORMS``); ValueError if
    it names none."""
    family, params = glu_parameters(activation)
    if family in ACTIVATIONS:
        act = ACTIVATIONS[family]
        return lambda gate, up: act(gate) * up
    return functools.partial(GLU_FAMILIES[family][0], **params)


def glu(activation: str, gate_up: torch.Tensor) -> torch.Tensor:
    """(R, 2·ffn) gate/up projections, gate first -> (R, ffn) hidden state."""
    ffn = gate_up.shape[1] // 2
    return glu_function(activation)(gate_up[:, :ffn], gate_up[:, ffn:])
