"""Reconstruction pruning (SparseGPT-style) under the hierarchical Block N:M + 2:4 constraint.

Pruning an expert weight W (out × in) whose inputs X (tokens × in) have the Gram matrix H = XᵀX, we look for W'
obeying the Block N:M mask with the smallest output error ‖X(W − W')ᵀ‖². Columns are processed left to right in
blocks; the mask of each block is chosen by ``sparsify``'s optimal selection on the OBS saliency w²/[H⁻¹]ⱼⱼ of the
weights as updated so far, and every pruned weight's error is spread over the columns not yet processed with the
rows of U, the upper Cholesky factor of the damped H⁻¹ (so [H⁻¹]ⱼⱼ is Uⱼⱼ², the inverse Hessian over the columns
left). The windows of a Block N:M mask are independent along K, so choosing it block by block (``_outer_width``
is a whole number of windows) is exact, and lets the mask see the updates, as in SparseGPT's adaptive selection.

The classic algorithm walks the columns one at a time. Here a chunk of c columns is solved at once: with p the
pruned indicator of a row, d = diag(U) and N = strict_upper(U)·diag(p/d), the chunk's errors are
e = (w·p/d)(I + N)⁻¹, and since N is nilpotent (I + N)⁻¹ = (I − N)(I + N²)(I + N⁴)…, log2(c) batched products over
all rows and experts at once. Chunks update the rest of their outer block, outer blocks the rest of the weight
(lazy updates, both GEMMs). Everything runs in float32 on the weight's device.

The sequential update can only move weights right of a pruned one, so the last blocks are barely compensated. A
few conjugate-gradient iterations then solve the remaining least-squares problem under the fixed mask exactly as
far as they go: the problem splits into one independent quadratic per row (its kept weights), and CG runs on all
rows at once, each with its own step sizes; an iteration costs one GEMM with H. The damping λ·I, kept in H for
both stages, pulls the weights toward the dense ones where the calibration tokens say little.

Experts routed too few calibration tokens to estimate H fall back to activation-aware pruning (|w|·‖x_col‖, no
update); ``reconstruct`` says which.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_float
from .blocknm import BlockNM, check_layout, check_ratio, sparsify
from .errors import InvalidArgumentError

CHUNK = 32  # columns solved at once: per row a c×c matrix, log2(c) batched products
OUTER = 256  # at least this many columns per mask-selection / lazy-update block (a whole number of windows)
MIN_TOKENS = 128  # fewer routed calibration tokens than this: activation-aware fallback
REFINE = 10  # conjugate-gradient iterations under the final mask


def _outer_width(inp: int, bm: int, bw: int) -> int:
    window = bm * bw
    return min(inp, window * math.ceil(OUTER / window))


def _inverse_hessian_factor(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + λI, U) with U (E, in, in) upper triangular, UᵀU = (H + λI)⁻¹ and λ = damp · mean(diag H) per expert;
    the damping grows tenfold until every expert's Cholesky factorisation succeeds."""
    h = gram.float()
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    for attempt in range(6):
        damped = h + damp * 10**attempt * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        if not bool((info > 0).any()):
            break
    else:
        raise InvalidArgumentError("gram: not positive semi-definite (Cholesky failed even with strong damping)")
    return damped, torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _refine(w: torch.Tensor, w0: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, iters: int) -> None:
    """``iters`` CG iterations, in place on ``w`` (E, out, in), for min (w − w0) H (w − w0)ᵀ per row over the
    entries ``keep`` marks (rows with nothing to solve take zero steps)."""
    m = keep.float()
    r = -((w - w0) @ h) * m
    p = r.clone()
    rr = r.square().sum(-1, keepdim=True)
    for _ in range(iters):
        hp = p @ h
        alpha = rr / (p * hp).sum(-1, keepdim=True).clamp_min(1e-30)
        w.add_(alpha * p)
        r.sub_(alpha * hp * m)
        rr_next = r.square().sum(-1, keepdim=True)
        p = r + rr_next / rr.clamp_min(1e-30) * p
        rr = rr_next


def _solve_chunk(w: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Errors e (E, out, c) of one chunk: e_j = p_j (w_j − Σ_{i<j} e_i U_ij) / U_jj for every row at once."""
    d = u.diagonal(dim1=-2, dim2=-1)[:, None, :]  # (E, 1, c)
    scale = pruned / d  # (E, out, c)
    m = -(u.triu(1)[:, None] * scale[..., None, :])  # −N, per row: (E, out, c, c)
    e = (w * scale)[..., None, :]  # (E, out, 1, c)
    steps = max(1, math.ceil(math.log2(w.shape[-1])))  # N^(2^steps) = 0
    for step in range(steps):
        e = e + e @ m
        if step + 1 < steps:
            m = m @ m
    return e[..., 0, :]


def _check_args(weight, gram, counts, bn, bm, bw, joint, halves, damp, min_tokens, refine):
    check_float("weight", weight, ndim=(2, 3))
    check_ratio(bn, bm, bw)
    w3 = weight if weight.dim() == 3 else weight[None]
    experts, out, inp = w3.shape
    check_layout(out, joint, halves)
    if inp % bw:
        raise InvalidArgumentError(f"weight: in = {inp} is not a multiple of bw = {bw}")
    check_float("gram", gram)
    g3 = gram if gram.dim() == 3 else gram[None]
    if tuple(g3.shape) != (experts, inp, inp):
        raise InvalidArgumentError(f"gram: expected shape {(experts, inp, inp)} (one in × in Gram matrix per expert), "
                                   f"got {tuple(gram.shape)}")
    if gram.device != weight.device:
        raise InvalidArgumentError(f"gram: on {gram.device}, weight on {weight.device}")
    if not bool(torch.isfinite(g3).all()) or not bool(torch.isfinite(w3).all()):
        raise InvalidArgumentError("weight and gram must be finite")
    if counts is not None and (not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (experts,)):
        raise InvalidArgumentError(f"counts: expected a tensor of {experts} routed-token counts")
    if not damp > 0:
        raise InvalidArgumentError(f"damp: expected > 0, got {damp}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise InvalidArgumentError(f"refine: expected an int >= 0, got {refine!r}")
    if min_tokens < 0:
        raise InvalidArgumentError(f"min_tokens: expected >= 0, got {min_tokens}")
    return w3, g3


@torch.no_grad()
def reconstruct(weight: torch.Tensor, gram: torch.Tensor, *, bn: int, bm: int, bw: int = 16,
                counts: torch.Tensor | None = None, min_tokens: int = MIN_TOKENS, damp: float = 0.01,
                refine: int = REFINE, dtype: torch.dtype = torch.bfloat16,
                joint: str | None = None, halves: bool = False) -> tuple[BlockNM, list[int]]:
    """Prune ``weight`` (out, in) or (E, out, in) to Block N:M, updating the kept weights to preserve the outputs.

    ``gram`` is the input Gram matrix XᵀX per expert ((in, in) or (E, in, in), e.g. from
    ``hare.calibration.expert_input_grams``), ``counts`` (E,) the calibration rows behind each (experts with fewer
    than ``min_tokens`` are pruned activation-aware, without update); ``damp`` the damping relative to mean(diag H),
    ``refine`` the CG iterations after the sequential pass (0: SparseGPT's update alone), ``joint`` the panel pairing
    of ``hare.sparsify`` (each block's mask then chosen jointly on the summed saliency), ``halves`` its panel layout
    (each half of the rows cut into panels from its own first row; the masks are chosen and stored in it). Returns the
    BlockNM weight (values in ``dtype``) and the indices of the experts that fell back.
    """
    w3, g3 = _check_args(weight, gram, counts, bn, bm, bw, joint, halves, damp, min_tokens, refine)
    experts, out, inp = w3.shape
    w = w3.float().clone()
    fallback = [] if counts is None else [e for e in range(experts) if int(counts[e]) < min_tokens]
    h, u = _inverse_hessian_factor(g3, damp)
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if fallback:
        fb = torch.tensor(fallback, device=w.device)
        norms = g3[fb].diagonal(dim1=-2, dim2=-1).float().clamp_min(0).sqrt()
        mask[fb] = sparsify(w[fb], bn=bn, bm=bm, bw=bw, score=w[fb].abs() * norms[:, None, :], dtype=w.dtype,
                            joint=joint, halves=halves).mask()
        u[fb] = torch.eye(inp, dtype=u.dtype, device=u.device)  # U = I: pruned weights are dropped, nothing updated
    keep_fixed = torch.zeros(experts, dtype=torch.bool, device=w.device)
    keep_fixed[fallback] = True
    outer = _outer_width(inp, bm, bw)
    for s in range(0, inp, outer):
        t = min(s + outer, inp)
        block = w[..., s:t]
        saliency = block.square() / u.diagonal(dim1=-2, dim2=-1)[:, None, s:t].square()
        chosen = sparsify(block, bn=bn, bm=bm, bw=bw, score=saliency, dtype=w.dtype, joint=joint, halves=halves).mask()
        mask[..., s:t] = torch.where(keep_fixed[:, None, None], mask[..., s:t], chosen)
        errors = torch.empty_like(block)
        for a in range(0, t - s, CHUNK):
            b = min(a + CHUNK, t - s)
            uc = u[:, s + a:s + b, s + a:s + b]
            err = _solve_chunk(block[..., a:b], (~mask[..., s + a:s + b]).float(), uc)
            block[..., a:b] -= err @ uc
            block[..., b:] -= err @ u[:, s + a:s + b, s + b:t]
            errors[..., a:b] = err
        block.mul_(mask[..., s:t])  # pruned weights are zero up to rounding; make them exactly zero
        w[..., t:] -= errors @ u[:, s:t, t:]
    if refine:
        _refine(w, w3.float(), mask & ~keep_fixed[:, None, None], h, refine)
    result = sparsify(w if weight.dim() == 3 else w[0], bn=bn, bm=bm, bw=bw,
                      score=(mask if weight.dim() == 3 else mask[0]).float(), dtype=dtype, joint=joint, halves=halves)
    return result, fallback
