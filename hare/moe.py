"""``hare.moe``: the MoE experts of a layer, routed rows in, combined tokens out.

Checks every argument first, then runs the fastest path the device allows: the Hopper kernels (``hare.gpu``) for
bf16 CUDA tensors on an sm_90 GPU with nvcc; for CUDA layers they do not compute (``hare.gpu.unsupported`` says
which) PyTorch's grouped GEMM (``hare.grouped_mm``); the reference path (``hare.reference``) everywhere else. On a CUDA
device where the kernels cannot run, it says why once (a warning) and which path it runs instead.
"""

from __future__ import annotations

import warnings

import torch

from ._checks import check_float, check_int, check_same_device, check_topk_ids
from .blocknm import BlockNM
from .errors import InvalidArgumentError
from . import grouped_mm
from .activations import glu_function
from .reference import reference_moe


def _check_weight(name: str, w, experts: int | None, rows: int | None, cols: int, x_dtype: torch.dtype):
    if isinstance(w, BlockNM):
        if not w.stacked:
            raise InvalidArgumentError(f"{name}: expected a stacked BlockNM (E, out, in), got shape {tuple(w.shape)}")
        shape = tuple(w.shape)
    else:
        check_float(name, w, ndim=3)
        if w.dtype != x_dtype:
            raise InvalidArgumentError(f"{name}: dtype {w.dtype} differs from x's {x_dtype}; cast one of them")
        shape = tuple(w.shape)
    want = (experts, rows, cols)
    if any(v is not None and v != s for v, s in zip(want, shape)):
        pretty = tuple("?" if v is None else v for v in want)
        raise InvalidArgumentError(f"{name}: expected shape {pretty}, got {shape}")
    return shape


def check_bias(name: str, b, shape: tuple[int, int]) -> None:
    """An optional per-expert bias: None, or a float tensor of ``shape``."""
    if b is None:
        return
    check_float(name, b, ndim=2)
    if tuple(b.shape) != shape:
        raise InvalidArgumentError(f"{name}: expected shape {shape} (one row per expert), got {tuple(b.shape)}")


def check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, check_ids: bool = True,
                   gate_up_bias=None, down_bias=None) -> None:
    check_float("x", x, ndim=2)
    check_int("topk_ids", topk_ids, ndim=2)
    check_float("topk_weights", topk_weights, ndim=2)
    if topk_ids.shape[0] != x.shape[0]:
        raise InvalidArgumentError(f"topk_ids: expected {x.shape[0]} rows (one per token of x), got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise InvalidArgumentError(f"topk_weights: expected topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    if not isinstance(activation, str):
        raise InvalidArgumentError(f"activation: expected a name such as 'silu', got {activation!r}")
    try:
        glu_function(activation)
    except ValueError as e:
        raise InvalidArgumentError(f"activation: {e}") from None
    hidden = x.shape[1]
    experts, two_ffn, _ = _check_weight("w_gate_up", w_gate_up, None, None, hidden, x.dtype)
    if two_ffn % 2:
        raise InvalidArgumentError(f"w_gate_up: expected an even number of rows (gate and up stacked), got {two_ffn}")
    _check_weight("w_down", w_down, experts, hidden, two_ffn // 2, x.dtype)
    check_bias("gate_up_bias", gate_up_bias, (experts, two_ffn))
    check_bias("down_bias", down_bias, (experts, hidden))
    tensors = dict(x=x, topk_ids=topk_ids, topk_weights=topk_weights)
    tensors.update({k: b for k, b in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)) if b is not None})
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        tensors[name] = w.values if isinstance(w, BlockNM) else w
    check_same_device(**tensors)
    if topk_ids.shape[1] > experts:
        raise InvalidArgumentError(f"topk_ids: top-k = {topk_ids.shape[1]} exceeds the {experts} experts")
    if check_ids:
        check_topk_ids(topk_ids, experts)


_warned: set[str] = set()


def _contiguous(w):
    return w if isinstance(w, BlockNM) else w.contiguous()


def backend(x: torch.Tensor, w_gate_up, w_down, activation: str = "silu", biased: bool = False) -> tuple[str, str]:
    """("hopper", "") when ``moe`` on these arguments runs the GPU kernels, else ("grouped_mm" or "reference", why
    not the kernels). ``biased`` (the layer has expert biases) never changes the path: every path adds them; it is
    accepted so that callers describing a whole layer need not drop it."""
    if not x.is_cuda:
        return "reference", f"tensors on {x.device}"
    from . import gpu

    why = gpu.unsupported(x, w_gate_up, w_down, activation)
    if why is None:
        return "hopper", ""
    ok, why_not = grouped_mm.available(x, w_gate_up, w_down)
    return ("grouped_mm", why) if ok else ("reference", f"{why}; {why_not}")


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up, w_down,
        activation: str = "silu", deterministic: bool = True, check_ids: bool = True, gate_up_bias=None,
        down_bias=None) -> torch.Tensor:
    """MoE experts: out[t] = Σ_j topk_weights[t, j] · W_down[e] (act(W_gate[e] x_t) ⊙ W_up[e] x_t), e = topk_ids[t, j].

    x (T, hidden); topk_ids, topk_weights (T, k); w_gate_up (E, 2·ffn, hidden) with the gate in rows [0:ffn] and
    the up projection in [ffn:2·ffn]; w_down (E, hidden, ffn). Weights are dense tensors or ``BlockNM``;
    ``activation`` is "silu" or "gelu" (tanh), or a clamped gated unit: "clamped-silu:limit=L", "gpt-oss"
    (GPT-OSS's clamped SwiGLU), "gpt-oss:alpha=A,limit=L" (``activations.glu_function``).
    Optional expert biases ``gate_up_bias`` (E, 2·ffn) and ``down_bias`` (E, hidden) are added after each
    projection, before the routing weight (in fp32 on the Hopper kernels). Returns (T, hidden)
    in x's dtype.
    ``deterministic`` (GPU only): sum the top-k results in slot order rather than with atomics, for
    bitwise-reproducible outputs.
    ``check_ids=False`` skips the range and duplicate check of ``topk_ids``, which reads values back to the host
    (a sync per call on GPU); only for callers whose ids come from a top-k over the experts, such as a model's
    own router (``hare.patch`` passes it). Out-of-range ids then give wrong results (the kernels clamp them into
    range: never a bad memory access).
    """
    check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, check_ids, gate_up_bias, down_bias)
    path, why = backend(x, w_gate_up, w_down, activation)
    if path == "hopper":  # arguments checked above, once: the kernels' unchecked entry
        from .gpu import run_fused_moe

        return run_fused_moe(x, topk_ids, topk_weights, _contiguous(w_gate_up), _contiguous(w_down), activation,
                             deterministic, gate_up_bias=gate_up_bias, down_bias=down_bias)
    if x.is_cuda and why not in _warned:
        _warned.add(why)
        name = "PyTorch's grouped GEMM" if path == "grouped_mm" else "the reference path"
        warnings.warn(f"hare.moe: using {name} on {x.device}: {why}", stacklevel=2)
    run = grouped_mm.grouped_mm_moe if path == "grouped_mm" else reference_moe
    return run(x, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias=gate_up_bias,
               down_bias=down_bias)
