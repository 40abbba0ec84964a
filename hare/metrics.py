"""How far an output is from its reference: the one error measure of the tests, the benchmarks, the demo and the
checkpoint reports."""

from __future__ import annotations

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ over all entries, in float64 (a zero reference gives ‖out‖ / 1e-300: huge unless out is
    zero too)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))
