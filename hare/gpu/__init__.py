"""Hopper (sm_90a) fast path of hare.moe for dense bf16 expert weights.

Public entry points:

* :func:`availability` -- whether the kernels can run on a device (sm_90 GPU, nvcc, cuda-bindings).
* :func:`build_layout` -- the routing layout of :func:`hare.routing.route`, built on the GPU with no host sync
  (two kernel launches; capturable in a CUDA graph; every shape fixed by tokens, top-k and experts).
* :func:`fused_moe` -- the routed expert MLP: gate/up GEMM with the token gather and SwiGLU/GELU fused, then the
  down GEMM with the routing weight, the return to token order and the top-k sum fused.

Kernels are CUDA C++ in ``hare/gpu/csrc``, compiled at first use with nvcc for sm_90a and cached on disk
(see ``_build``); they are launched with the CUDA driver API through cuda-bindings, which is imported lazily,
so this package imports on a CPU-only machine. Both ops are torch.library custom ops (``torch.ops.hare.*``), so
they run under torch.compile and inside CUDA graphs (call each once before capture: the first call loads the
kernels).

Determinism: ``fused_moe(..., deterministic=True)`` (the default) writes every (token, slot) row of the down
GEMM to a buffer and sums the top-k rows in slot order in a separate pass, so results are bitwise identical from
run to run and independent of scheduling. ``deterministic=False`` accumulates the rows with fp32 vector atomics
instead (order-dependent rounding). The default is deterministic because reproducible serving and tests matter
more than the small difference measured in notes/kernels.md.
"""

from __future__ import annotations

import functools

import torch

from ..errors import InvalidArgumentError
from ..routing import DEFAULT_BLOCK, RoutingLayout

__all__ = ["availability", "build_layout", "fused_moe", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
K_ALIGN = 64  # hidden and ffn must be multiples of this (the K step of the weight tiles)


@functools.lru_cache(maxsize=None)
def _availability(index: int) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if index >= torch.cuda.device_count():
        return False, f"no CUDA device {index}"
    cap = torch.cuda.get_device_capability(index)
    if cap != (9, 0):
        name = torch.cuda.get_device_name(index)
        return False, f"{name} is sm_{cap[0]}{cap[1]}; the Hare kernels need sm_90 (H100/H200)"
    from . import _build

    if _build.find_nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME or HARE_NVCC): the kernels are compiled at first use"
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False, "cuda-bindings is not installed (pip install cuda-bindings)"
    return True, "ok"


def availability(device=None) -> tuple[bool, str]:
    """(True, "ok") when the kernels can run on ``device`` (default: the current CUDA device), else (False, why)."""
    if device is None:
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device {device} is not a CUDA device"
    return _availability(device.index if device.index is not None else torch.cuda.current_device())


def build_layout(topk_ids: torch.Tensor, num_experts: int, block: int = DEFAULT_BLOCK) -> RoutingLayout:
    """hare.routing.route on the GPU: same fields, same values; no host sync; CUDA-graph capturable.

    Ids are not range-checked on the device (that would need a sync): they must lie in [0, num_experts).
    In eager mode the fields are views of one int32 buffer. The build uses a per-device ticket counter (reset by
    the kernel itself), so layouts must not be built concurrently on two streams of one device.
    """
    from . import ops

    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.is_floating_point():
        raise InvalidArgumentError("topk_ids: expected an integer tensor of shape (tokens, top_k)")
    if not topk_ids.is_cuda:
        raise InvalidArgumentError("topk_ids: expected a CUDA tensor")
    T, k = topk_ids.shape
    if torch.compiler.is_compiling():
        tensors = list(torch.ops.hare.build_layout(topk_ids, int(num_experts), int(block)))
    else:
        tensors = ops.layout_into(topk_ids, int(num_experts), int(block))
    return ops.to_layout(tensors, T, k, int(num_experts), int(block))


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
    deterministic: bool = True,
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * W_down[e] (act(W_gate[e] x_t) * W_up[e] x_t), e = topk_ids[t,j].

    x (T, H) bf16; topk_ids (T, k) int; topk_weights (T, k) float; w_gate_up (E, 2F, H) bf16 (rows [0, F) gate,
    [F, 2F) up); w_down (E, H, F) bf16; all on one sm_90 device. H and F must be multiples of 64.
    Returns (T, H) bf16. ``deterministic`` (default True): see the module docstring.
    """
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    for name, t, nd in (("x", x, 2), ("topk_ids", topk_ids, 2), ("topk_weights", topk_weights, 2),
                        ("w_gate_up", w_gate_up, 3), ("w_down", w_down, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise InvalidArgumentError(f"{name}: expected a {nd}-D tensor")
        if not t.is_cuda:
            raise InvalidArgumentError(f"{name}: expected a CUDA tensor")
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != torch.bfloat16:
            raise InvalidArgumentError(f"{name}: expected bfloat16, got {t.dtype}")
    T, H = x.shape
    E, F2, H2 = w_gate_up.shape
    F = F2 // 2
    if H2 != H or F2 % 2 or tuple(w_down.shape) != (E, H, F):
        raise InvalidArgumentError(
            f"shapes: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)} "
            "(expected (T, H), (E, 2F, H), (E, H, F))")
    if H % 64 or F % 64:
        raise InvalidArgumentError(f"hidden ({H}) and ffn ({F}) must be multiples of 64 for the GPU kernels")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise InvalidArgumentError("topk_ids and topk_weights must both be (T, k)")
    if not (w_gate_up.is_contiguous() and w_down.is_contiguous()):
        raise InvalidArgumentError("expert weights must be contiguous")
    if torch.compiler.is_compiling():
        return torch.ops.hare.fused_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation, bool(deterministic))
    # eager (and CUDA-graph capture): skip the custom-op dispatcher, which costs ~80 us per call in eager mode
    from . import ops

    return ops.fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, w_down, activation, bool(deterministic))


# the custom ops are registered at import (no CUDA needed for that)
from . import ops as _ops  # noqa: E402,F401
