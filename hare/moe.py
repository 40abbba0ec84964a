"""``hare.moe``: the MoE experts of a layer, routed rows in, combined tokens out.

Checks every argument first, then runs the fastest path the device allows: the Hopper kernels (``hare.gpu``) for
bf16 CUDA tensors on an sm_90 GPU with nvcc; for CUDA layers they do not compute (``hare.gpu.unsupported`` says
which) PyTorch's grouped GEMM (``hare.grouped_mm``); the reference path (``hare.reference``) everywhere else. On a CUDA
device where the kernels cannot run, it says why once (a warning) and which path it runs instead.

An eager call is cheap on the host (notes/decode_overhead.md): the argument pass is one test of the common case
(``_plain_args_ok``, stricter than ``check_moe_args``, whose full pass then runs only to name what is wrong), the
path is cached per (device, dtypes, sizes, activation), and the kernels' launches are prepared once per shape
(``hare.gpu``). The id check (``check_ids``) runs on the device on the Hopper path (no host sync; a bad id is
raised at the next call or ``hare.gpu.check_errors()``, and the bad call's output is NaN), on the host elsewhere.
"""

from __future__ import annotations

import warnings

import torch

from ._checks import FLOAT_DTYPES, INT_DTYPES, check_float, check_int, check_same_device, check_topk_ids
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
    _ACTIVATIONS.add(activation)
    if check_ids:
        check_topk_ids(topk_ids, experts)


_FLOATS, _INTS = frozenset(FLOAT_DTYPES), frozenset(INT_DTYPES)
_ACTIVATIONS: set[str] = set()  # names check_moe_args accepted (glu_function parses them)


def _weight_shape(w, dtype: torch.dtype, device: torch.device):
    """A weight's (E, out, in) when it is a stacked BlockNM or a 3-d tensor of `dtype`, on `device`; else None."""
    if type(w) is BlockNM:
        return tuple(w.shape) if len(w.shape) == 3 and w.values.device == device else None
    if isinstance(w, torch.Tensor) and w.dtype == dtype and w.device == device and w.dim() == 3:
        return tuple(w.shape)
    return None


def _plain_args_ok(x, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias, down_bias) -> bool:
    """True only where ``check_moe_args`` (ids unchecked) accepts these arguments: the common case tested in one
    cheap pass. False says nothing wrong by itself; the full pass then runs and names the fault. Stricter, never
    looser (tests/test_host_path.py draws arguments good and bad and holds it to that)."""
    if not (isinstance(x, torch.Tensor) and isinstance(topk_ids, torch.Tensor)
            and isinstance(topk_weights, torch.Tensor) and type(activation) is str and activation in _ACTIVATIONS):
        return False
    xs, ids = x.shape, topk_ids.shape
    if len(xs) != 2 or len(ids) != 2 or topk_weights.shape != ids or ids[0] != xs[0]:
        return False
    dtype, device = x.dtype, x.device
    if (dtype not in _FLOATS or topk_ids.dtype not in _INTS or topk_weights.dtype not in _FLOATS
            or topk_ids.device != device or topk_weights.device != device):
        return False
    gu, dn = _weight_shape(w_gate_up, dtype, device), _weight_shape(w_down, dtype, device)
    if gu is None or dn is None:
        return False
    E, F2, H = gu
    if H != xs[1] or F2 % 2 or dn != (E, H, F2 // 2) or ids[1] > E:
        return False
    for b, shape in ((gate_up_bias, (E, F2)), (down_bias, (E, H))):
        if b is not None and not (isinstance(b, torch.Tensor) and b.dtype in _FLOATS and b.shape == shape
                                  and b.device == device):
            return False
    return True


_warned: set[str] = set()


def _contiguous(w):
    return w if isinstance(w, BlockNM) or w.is_contiguous() else w.contiguous()


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


_backends: dict[tuple, tuple[str, str]] = {}


def _cached_backend(x, w_gate_up, w_down, activation: str) -> tuple[str, str]:
    """``backend``, cached by everything it reads: the device (its facts are fixed per process), the dtypes, the
    sizes the kernels need aligned, the activation and each Block N:M weight's panel layout."""
    key = (x.device, x.dtype, type(w_gate_up), type(w_down), w_gate_up.dtype, w_down.dtype, x.shape[1],
           w_down.shape[2], activation, isinstance(w_gate_up, BlockNM) and w_gate_up.halves,
           isinstance(w_down, BlockNM) and w_down.halves)
    path = _backends.get(key)
    if path is None:
        if len(_backends) > 1024:
            _backends.clear()
        path = _backends[key] = backend(x, w_gate_up, w_down, activation)
    return path


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
    ``check_ids`` (default True) refuses ids out of [0, E) and a token routed to one expert twice. On the Hopper
    kernels the layout kernel checks them on the device, with no host sync (also inside CUDA graphs): the bad
    call's output is all NaN, and ``InvalidArgumentError`` names the token, slot and value at the next ``hare.moe``
    call on that device or at ``hare.gpu.check_errors()``. Elsewhere the check runs before the call and reads the
    ids back to the host. ``check_ids=False`` skips it, for callers whose ids come from a top-k over the experts,
    such as a model's own router (``hare.patch`` passes it); out-of-range ids then give wrong results (the kernels
    clamp them into range: never a bad memory access).
    """
    compiling = torch.compiler.is_compiling()
    if compiling:  # traced: the plain passes (no caches to trace)
        check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, False, gate_up_bias, down_bias)
        path, why = backend(x, w_gate_up, w_down, activation)
    else:
        if not _plain_args_ok(x, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias, down_bias):
            check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, False, gate_up_bias, down_bias)
        path, why = _cached_backend(x, w_gate_up, w_down, activation)
    if path == "hopper":  # arguments checked above, once: the kernels' unchecked entry (ids checked on the device)
        from .gpu import run_fused_moe

        return run_fused_moe(x, topk_ids, topk_weights, _contiguous(w_gate_up), _contiguous(w_down), activation,
                             deterministic, None, gate_up_bias, down_bias, check_ids)
    if check_ids:
        check_topk_ids(topk_ids, w_gate_up.shape[0])
    if x.is_cuda and why not in _warned:
        _warned.add(why)
        name = "PyTorch's grouped GEMM" if path == "grouped_mm" else "the reference path"
        warnings.warn(f"hare.moe: using {name} on {x.device}: {why}", stacklevel=2)
    run = grouped_mm.grouped_mm_moe if path == "grouped_mm" else reference_moe
    return run(x, topk_ids, topk_weights, w_gate_up, w_down, activation, gate_up_bias=gate_up_bias,
               down_bias=down_bias)
