"""Hopper (sm_90a) fast path of hare.moe for bf16 expert weights, dense or Block N:M sparse.

Public entry points:

* :func:`availability` -- whether the kernels can run on a device (sm_90 GPU, nvcc, cuda-bindings).
* :func:`build_layout` -- the routing layout of :func:`hare.routing.route`, built on the GPU with no host sync
  (two kernel launches; capturable in a CUDA graph; every shape fixed by tokens, top-k and experts).
* :func:`fused_moe` -- the routed expert MLP: gate/up GEMM with the token gather and SwiGLU/GELU fused, then the
  down GEMM with the routing weight, the return to token order and the top-k sum fused. Dense bf16 weights run
  on wgmma; Block N:M (``hare.BlockNM``) weights run on the sparse tensor cores (``wgmma.mma_async.sp``), looping
  only over each 128-row panel's kept K blocks.

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

from ..blocknm import PANEL, BlockNM
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


def _weight_parts(name: str, w) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, tuple]:
    """(values or dense weight, meta, block_idx, bw, logical shape) of a dense tensor or a stacked BlockNM."""
    if isinstance(w, BlockNM):
        if not w.stacked:
            raise InvalidArgumentError(f"{name}: expected a stacked BlockNM (E, out, in), got shape {tuple(w.shape)}")
        parts = (w.values, w.meta, w.block_idx)
        if not all(t.is_contiguous() for t in parts):
            raise InvalidArgumentError(f"{name}: BlockNM storage must be contiguous")
        return w.values, w.meta, w.block_idx, w.bw, tuple(w.shape)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise InvalidArgumentError(f"{name}: expected a 3-D tensor or a stacked BlockNM")
    if not w.is_contiguous():
        raise InvalidArgumentError(f"{name}: expert weights must be contiguous")
    return w, None, None, 0, tuple(w.shape)


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up,
    w_down,
    activation: str = "silu",
    deterministic: bool = True,
) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * W_down[e] (act(W_gate[e] x_t) * W_up[e] x_t), e = topk_ids[t,j].

    x (T, H) bf16; topk_ids (T, k) int; topk_weights (T, k) float; w_gate_up (E, 2F, H) (rows [0, F) gate,
    [F, 2F) up) and w_down (E, H, F), each a bf16 tensor or a stacked ``hare.BlockNM`` with bf16 values (the
    sparse kernels run on its compressed storage); all on one sm_90 device. H and F must be multiples of 64, and F
    of 128 when w_gate_up is Block N:M (so gate panel m and up panel m cover the same ffn columns).
    Returns (T, H) bf16. ``deterministic`` (default True): see the module docstring.
    """
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    gu, gu_meta, gu_idx, gu_bw, gu_shape = _weight_parts("w_gate_up", w_gate_up)
    dn, d_meta, d_idx, d_bw, d_shape = _weight_parts("w_down", w_down)
    for name, t, nd in (("x", x, 2), ("topk_ids", topk_ids, 2), ("topk_weights", topk_weights, 2),
                        ("w_gate_up", gu, 3), ("w_down", dn, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise InvalidArgumentError(f"{name}: expected a {nd}-D tensor")
        if not t.is_cuda:
            raise InvalidArgumentError(f"{name}: expected a CUDA tensor")
    for name, t in (("x", x), ("w_gate_up", gu), ("w_down", dn)):
        if t.dtype != torch.bfloat16:
            raise InvalidArgumentError(f"{name}: expected bfloat16, got {t.dtype}")
    if len({t.device for t in (x, topk_ids, topk_weights, gu, dn)}) != 1:
        raise InvalidArgumentError("x, topk_ids, topk_weights and the weights must be on one device")
    T, H = x.shape
    E, F2, H2 = gu_shape
    F = F2 // 2
    if H2 != H or F2 % 2 or d_shape != (E, H, F):
        raise InvalidArgumentError(
            f"shapes: x {tuple(x.shape)}, w_gate_up {gu_shape}, w_down {d_shape} (expected (T, H), (E, 2F, H), (E, H, F))")
    if H % K_ALIGN or F % K_ALIGN:
        raise InvalidArgumentError(f"hidden ({H}) and ffn ({F}) must be multiples of {K_ALIGN} for the GPU kernels")
    if gu_meta is not None and F % PANEL:
        raise InvalidArgumentError(f"ffn ({F}) must be a multiple of {PANEL} for Block N:M gate/up weights on the GPU "
                                   "(a 128-row panel would hold both gate and up rows)")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise InvalidArgumentError("topk_ids and topk_weights must both be (T, k)")
    args = (x, topk_ids, topk_weights, gu, gu_meta, gu_idx, gu_bw, dn, d_meta, d_idx, d_bw, activation,
            bool(deterministic))
    if torch.compiler.is_compiling():
        return torch.ops.hare.fused_moe(*args)
    # eager (and CUDA-graph capture): skip the custom-op dispatcher, which costs ~80 us per call in eager mode
    from . import ops

    return ops.fused_moe_impl(*args)


# the custom ops are registered at import (no CUDA needed for that)
from . import ops as _ops  # noqa: E402,F401
