"""Argument checks shared by the public functions. Each raises InvalidArgumentError naming the argument."""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None, dtypes=None, kind: str = "") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise InvalidArgumentError(f"{name}: expected {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise InvalidArgumentError(f"{name}: expected {kind or 'dtype'} ({names}), got {value.dtype}")
    return value


def check_float(name: str, value, *, ndim=None) -> torch.Tensor:
    return check_tensor(name, value, ndim=ndim, dtypes=FLOAT_DTYPES, kind="a floating dtype")


def check_int(name: str, value, *, ndim=None) -> torch.Tensor:
    return check_tensor(name, value, ndim=ndim, dtypes=INT_DTYPES, kind="an integer dtype")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise InvalidArgumentError(f"all tensors must be on one device, got {listed}")
    return next(iter(devices.values()))


def values_checkable(t: torch.Tensor) -> bool:
    """Value checks read data back to the host; skip them while tracing for torch.compile or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int, name: str = "topk_ids") -> None:
    """Ids must lie in [0, num_experts) and be distinct within a token (one host sync for all checks)."""
    check_int(name, topk_ids, ndim=2)
    if topk_ids.numel() == 0 or not values_checkable(topk_ids):
        return
    s = topk_ids.sort(dim=1).values
    dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
    first_dup = torch.where(dup, torch.arange(dup.numel(), device=dup.device), dup.numel()).min()
    lo, hi, t = torch.stack([s[:, 0].min().long(), s[:, -1].max().long(), first_dup]).tolist()
    if lo < 0 or hi >= num_experts:
        raise InvalidArgumentError(f"{name}: expert ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    if t < topk_ids.shape[0]:
        raise InvalidArgumentError(f"{name}: token {t} is routed to the same expert twice: {topk_ids[t].tolist()}")
