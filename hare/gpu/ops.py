"""The GPU implementations behind hare.gpu's public functions, and their torch.library registrations.

Nothing here imports cuda.bindings at module import: ``_launch`` is imported inside the implementations.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ..routing import RoutingLayout, max_blocks, route

BLOCK_NS = (16, 32, 64, 128)
_LAYOUT_SMEM_CAP = 200 * 1024
_LAYOUT_TILE_ITEMS = 2048  # kLayoutTileItems in csrc/layout.cuh


def choose_block_n(num_rows: int, num_experts: int) -> int:
    """Token rows per tile (wgmma N) for a launch, from (tokens·k, experts) alone (never the routing).

    The smallest N >= twice the mean rows per touched expert, so a uniformly routed expert rarely spills into a
    second, nearly empty block (each block re-reads the expert's weights); 128 for prefill.
    """
    mean = num_rows / max(1, min(num_experts, num_rows))
    for bn in BLOCK_NS:
        if bn >= 2 * mean:
            return bn
    return BLOCK_NS[-1]


# ------------------------------------------------------------------------------------------- layout
def _layout_plan(R: int, E: int) -> tuple[int, int]:
    """(tile_items, num_tiles) of the layout kernels: 2048 assignments per CTA."""
    return _LAYOUT_TILE_ITEMS, -(-R // _LAYOUT_TILE_ITEMS)


def layout_supported(R: int, E: int) -> bool:
    """The last CTA of layout_count holds a num_tiles x E table in shared memory."""
    _, nt = _layout_plan(max(R, 1), E)
    return 4 * (8 * E + nt * E + 4 * E) <= _LAYOUT_SMEM_CAP


def _layout_offsets(R: int, E: int, B: int, num_tiles: int) -> tuple[list[int], int]:
    """int32 element offsets of [counts, offsets, gather_index, row_assignment, assignment_row, block_expert,
    block_start, block_height, num_blocks, tile_base] in one buffer, and the total."""
    sizes = (E, E + 1, R, R, R, B, B, B, 1, num_tiles * E)
    offs, o = [], 0
    for n in sizes:
        offs.append(o)
        o += n
    return offs, o


def _launch_layout(mod, stream: int, ids: torch.Tensor, E: int, block: int, R: int, B: int, base_ptr: int) -> list[int]:
    """Launch the two layout kernels writing into the int32 buffer at base_ptr; returns the field pointers."""
    from . import _launch

    tile_items, num_tiles = _layout_plan(R, E)
    offs, _ = _layout_offsets(R, E, B, num_tiles)
    ptrs = [base_ptr + 4 * o for o in offs]
    p = _launch.layout_params(
        ids.data_ptr(), *ptrs, mod.ticket.data_ptr(),
        1 if ids.dtype == torch.int64 else 0, R, ids.shape[1], E, block, B, tile_items, num_tiles,
    )
    mod.launch("hare_layout_count", num_tiles, 256, 4 * (8 * E + num_tiles * E + 4 * E), stream, p)
    if num_tiles > 1:
        mod.launch("hare_layout_scatter", num_tiles, 256, 4 * 8 * E, stream, p)
    return ptrs


def _prep_ids(topk_ids: torch.Tensor) -> torch.Tensor:
    ids = topk_ids
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int32)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    return ids


def layout_into(topk_ids: torch.Tensor, num_experts: int, block: int, buf: torch.Tensor | None = None):
    """Build the layout of hare.routing.route on the GPU (two launches, no host sync) into views of one int32
    buffer: [counts, offsets, gather_index, row_assignment, assignment_row, block_expert, block_start,
    block_height, num_blocks]."""
    from . import _launch

    dev = topk_ids.device
    T, k = topk_ids.shape
    E = num_experts
    R = T * k
    B = max_blocks(R, E, block)
    _, num_tiles = _layout_plan(max(R, 1), E)
    offs, total = _layout_offsets(R, E, B, num_tiles)
    if buf is None:
        buf = torch.empty(total, dtype=torch.int32, device=dev)
    sizes = [b - a for a, b in zip(offs, offs[1:] + [total])]
    views = list(torch.split(buf[:total], sizes))
    views[8] = views[8].view(())
    outs = views[:9]
    if R == 0:
        outs[0].zero_()
        outs[1].zero_()
        outs[8].zero_()
        return outs
    if not layout_supported(R, E):  # very large T*k*E: the torch-ops layout (no host sync either)
        ref = route(topk_ids, E, block)
        for o, f in zip(outs, (ref.counts, ref.offsets, ref.gather_index, ref.row_assignment, ref.assignment_row,
                               ref.block_expert, ref.block_start, ref.block_height, ref.num_blocks)):
            o.copy_(f.reshape(o.shape))
        return outs
    mod = _launch.module(dev)
    _launch_layout(mod, _launch.current_stream(dev), _prep_ids(topk_ids), E, block, R, B, buf.data_ptr())
    return outs


def layout_tensors(topk_ids: torch.Tensor, num_experts: int, block: int) -> list[torch.Tensor]:
    """As layout_into, each field its own tensor (the custom op's outputs must not share storage)."""
    return [t.clone() for t in layout_into(topk_ids, num_experts, block)]


def to_layout(tensors: list[torch.Tensor], T: int, k: int, E: int, block: int) -> RoutingLayout:
    (counts, offsets, gather_index, row_assignment, assignment_row, block_expert, block_start, block_height,
     num_blocks) = tensors
    return RoutingLayout(
        num_tokens=T, top_k=k, num_experts=E, block=block, counts=counts, offsets=offsets,
        gather_index=gather_index, row_assignment=row_assignment, assignment_row=assignment_row,
        block_expert=block_expert, block_start=block_start, block_height=block_height, num_blocks=num_blocks,
    )


# ------------------------------------------------------------------------------------------- fused MoE
def _best_splits(tiles: int, nk: int, num_sms: int, max_splits: int = 16) -> int:
    """K splits for `tiles` output tiles of nk 64-wide K blocks. Only below one wave of tiles (decode): there the
    GPU would be part idle, so K is split to minimise waves/splits on the persistent grid (plus a small per-split
    cost); each split keeps >= 4 K blocks. From one wave up, splitting only adds partial-sum traffic."""
    if tiles >= num_sms:
        return 1
    best, best_cost = 1, float("inf")
    for s in range(1, max(1, min(max_splits, nk // 4)) + 1):
        cost = -(-tiles * s // num_sms) / s + 0.02 * s
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return normalize_splits(best, nk)


def normalize_splits(splits: int, nk: int) -> int:
    """The number of non-empty splits when nk K blocks are cut into chunks of ceil(nk / splits)."""
    kpb = -(-nk // max(1, splits))
    return -(-nk // kpb)


def _est_blocks(num_rows: int, num_experts: int, block_n: int) -> int:
    return min(num_experts, num_rows) + num_rows // block_n


def down_splits(num_rows: int, num_experts: int, block_n: int, hidden: int, k_stages: int, num_sms: int) -> int:
    """K splits of the down GEMM (k_stages 64-column stages over K): at decode few (block, 256-row) tiles exist,
    so K is split across CTAs."""
    if num_rows > 4096:
        return 1
    tiles = _est_blocks(num_rows, num_experts, block_n) * (-(-hidden // 256))
    return _best_splits(tiles, k_stages, num_sms)


def gateup_splits(num_rows: int, num_experts: int, block_n: int, ffn: int, k_stages: int, num_sms: int) -> int:
    """K splits of the gate/up GEMM (fp32 partials + hare_glu_combine) at decode; 1 otherwise."""
    if num_rows > 4096 or _GATEUP_SPLIT_OFF:
        return 1
    tiles = _est_blocks(num_rows, num_experts, block_n) * (-(-ffn // 128))
    return _best_splits(tiles, k_stages, num_sms)


_GATEUP_SPLIT_OFF = os.environ.get("HARE_GATEUP_SPLIT") == "0"


def raster_group(kind: str, block_n: int, K: int) -> int:
    """Tile order of a GEMM launch (scheduler.cuh): > 0 M-grouped with that many M tiles, < 0 block-grouped
    with that many row blocks. HARE_RASTER_GATEUP / HARE_RASTER_DOWN override (experiments)."""
    env = _RASTER_OVERRIDE.get(kind)
    if env:
        return int(env)
    return 8


_RASTER_OVERRIDE = {"gateup": os.environ.get("HARE_RASTER_GATEUP"), "down": os.environ.get("HARE_RASTER_DOWN")}


class _Weights(NamedTuple):
    """One projection's weights as a GEMM launch takes them: dense (bf16 tensor) or Block N:M (values, 2:4
    metadata, kept block indices)."""

    suffix: str  # kernel name part: "" dense, "_sp" sparse
    maps: tuple  # TMA descriptors: (weights,) or (values, metadata)
    block_idx: int  # pointer (sparse) or 0
    k_stages: int  # 64-logical-column pipeline stages over K
    kept: int
    bw_log2: int
    panels: int
    shared_b: int  # every K block kept (1:1): the two weight boxes of a tile read the same token columns

    @staticmethod
    def of(w: torch.Tensor, meta: torch.Tensor | None, block_idx: torch.Tensor | None, bw: int, K: int) -> "_Weights":
        from . import _launch

        if meta is None:
            E, out, _ = w.shape
            return _Weights("", (_launch.weight_tensor_map(w, E * out, K),), 0, K // 64, 0, 0, 0, 0)
        kept = block_idx.shape[-1]
        return _Weights("_sp", _launch.sparse_tensor_maps(w, meta), block_idx.data_ptr(), -(-kept * bw // 64), kept,
                        bw.bit_length() - 1, block_idx.shape[1], int(kept * bw == K))

    def params(self, b_src: int, out: int, lay_ptrs, split_stride: int, K: int, M: int, rows: int, box1: int,
               m_tile: int, num_m: int, splits: int, kpb: int, k: int, R: int, group: int, E: int, B: int):
        from . import _launch

        return _launch.gemm_params(b_src, out, *lay_ptrs, self.block_idx, split_stride, K, M, rows, box1, m_tile,
                                   num_m, splits, kpb, k, R, group, self.k_stages, self.kept, self.bw_log2,
                                   self.panels, self.shared_b, E, B)


def fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, w_down, d_meta, d_block_idx,
                   d_bw, activation: str, deterministic: bool):
    """Both projections, each dense (meta None) or Block N:M (values, meta, block_idx, bw)."""
    from . import _launch

    T, H = x.shape
    E, F2, _ = w_gate_up.shape
    F = F2 // 2
    k = topk_ids.shape[1]
    dev = x.device
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    if T == 0:
        return out
    R = T * k
    mod = _launch.module(dev)
    stream = _launch.current_stream(dev)
    bn = choose_block_n(R, E)
    B = max_blocks(R, E, bn)
    if not layout_supported(R, E):
        lay = layout_into(topk_ids, E, bn)
        lptrs = [t.data_ptr() for t in lay]
    else:
        _, num_tiles = _layout_plan(R, E)
        lbuf = torch.empty(_layout_offsets(R, E, B, num_tiles)[1], dtype=torch.int32, device=dev)
        lptrs = _launch_layout(mod, stream, _prep_ids(topk_ids), E, bn, R, B, lbuf.data_ptr())
    if not x.is_contiguous():
        x = x.contiguous()
    wts = topk_weights
    if wts.dtype != torch.float32:
        wts = wts.float()
    if not wts.is_contiguous():
        wts = wts.contiguous()
    gu = _Weights.of(w_gate_up, gu_meta, gu_block_idx, gu_bw, H)
    dn = _Weights.of(w_down, d_meta, d_block_idx, d_bw, F)
    splits = normalize_splits(down_splits(R, E, bn, H, dn.k_stages, mod.num_sms), dn.k_stages)
    direct = deterministic and k == 1 and splits == 1
    ysize = 0 if (direct or not deterministic) else splits * R * H
    ws = torch.empty(R * F + ysize, dtype=torch.bfloat16, device=dev)
    h_ptr = ws.data_ptr()
    # gather_index, row_assignment, weights, block_expert, block_start, block_height, num_blocks
    lay_ptrs = (lptrs[2], lptrs[3], wts.data_ptr(), lptrs[5], lptrs[6], lptrs[7], lptrs[8])

    # gate/up: h (R, F) = act(x[g] W_gate^T) * (x[g] W_up^T), expert-sorted rows
    num_m = -(-F // 128)
    act = "silu" if activation == "silu" else "gelu"
    nk = gu.k_stages
    gsplits = normalize_splits(gateup_splits(R, E, bn, F, nk, mod.num_sms), nk)
    gkpb = -(-nk // gsplits)
    grid = max(1, min(mod.num_sms, B * num_m * gsplits))
    name, smem = f"hare_gateup_{act}{gu.suffix}_bn{bn}", _launch.gemm_smem_bytes(bn, bool(gu.suffix))
    group = raster_group("gateup", bn, H)
    if gsplits == 1:
        p = gu.params(x.data_ptr(), h_ptr, lay_ptrs, 0, H, F, F2, F, 128, num_m, 1, nk, k, R, group, E, B)
        mod.launch(name, grid, 384, smem, stream, *gu.maps, p)
    else:
        part = torch.empty(gsplits * R * F2, dtype=torch.float32, device=dev)
        p = gu.params(x.data_ptr(), part.data_ptr(), lay_ptrs, R * F2, H, F, F2, F, 128, num_m, gsplits, gkpb, k, R,
                      group, E, B)
        mod.launch(name, grid, 384, smem, stream, *gu.maps, p)
        gp = _launch.glu_params(part.data_ptr(), h_ptr, R * F2, R, F, gsplits)
        mod.launch(f"hare_glu_combine_{act}", max(1, min(-(-(R * F) // 256), 8 * mod.num_sms)), 256, 0, stream, gp)

    # down: y = (h W_down^T) * routing weight, back in token order
    num_m = -(-H // 256)
    kpb = -(-dn.k_stages // splits)
    grid = max(1, min(mod.num_sms, B * num_m * splits))
    smem = _launch.gemm_smem_bytes(bn, bool(dn.suffix))
    group = raster_group("down", bn, F)
    if deterministic:
        y_ptr = out.data_ptr() if direct else h_ptr + 2 * R * F
        p = dn.params(h_ptr, y_ptr, lay_ptrs, R * H, F, H, H, 128, 256, num_m, splits, kpb, k, R, group, E, B)
        mod.launch(f"hare_down_det{dn.suffix}_bn{bn}", grid, 384, smem, stream, *dn.maps, p)
        if not direct:
            cp = _launch.combine_params(y_ptr, out.data_ptr(), R * H, T, H, k, splits)
            chunks = T * H // 8
            mod.launch("hare_combine", max(1, min(-(-chunks // 256), 8 * mod.num_sms)), 256, 0, stream, cp)
    else:
        acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
        p = dn.params(h_ptr, acc.data_ptr(), lay_ptrs, 0, F, H, H, 128, 256, num_m, splits, kpb, k, R, group, E, B)
        mod.launch(f"hare_down_fast{dn.suffix}_bn{bn}", grid, 384, smem, stream, *dn.maps, p)
        out.copy_(acc)
    return out


# ------------------------------------------------------------------------------------------- torch.library
@torch.library.custom_op("hare::build_layout", mutates_args=())
def build_layout_op(
    topk_ids: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    return tuple(layout_tensors(topk_ids, num_experts, block))


@build_layout_op.register_fake
def _build_layout_fake(topk_ids, num_experts, block):
    T, k = topk_ids.shape
    R = T * k
    B = max_blocks(R, num_experts, block)
    e = lambda *s: topk_ids.new_empty(s, dtype=torch.int32)  # noqa: E731
    return (e(num_experts), e(num_experts + 1), e(R), e(R), e(R), e(B), e(B), e(B), e())


@torch.library.custom_op("hare::fused_moe", mutates_args=())
def fused_moe_op(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    gu_meta: torch.Tensor | None,
    gu_block_idx: torch.Tensor | None,
    gu_bw: int,
    w_down: torch.Tensor,
    d_meta: torch.Tensor | None,
    d_block_idx: torch.Tensor | None,
    d_bw: int,
    activation: str,
    deterministic: bool,
) -> torch.Tensor:
    """Dense weights: meta and block_idx None; Block N:M weights: their values, meta, block_idx and bw."""
    return fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, w_down, d_meta,
                          d_block_idx, d_bw, activation, deterministic)


@fused_moe_op.register_fake
def _fused_moe_fake(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, w_down, d_meta, d_block_idx,
                    d_bw, activation, deterministic):
    return x.new_empty(x.shape, dtype=torch.bfloat16)
