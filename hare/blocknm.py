"""Hierarchical Block N:M weights: block sparsity along K per 128-row panel, 2:4 inside the kept blocks.

A weight (out × in), or a stack of experts (E × out × in), is cut into panels of ``PANEL = 128`` rows. Along K
the columns form blocks of ``bw`` columns and the blocks form windows of ``bm`` blocks. In every window each
panel keeps ``bn`` blocks (the same ones for all its rows); when the block count ``in / bw`` is not a multiple of
``bm``, the last, partial window of ``r`` blocks keeps ``ceil(r·bn/bm)``. Inside a kept block every row keeps 2
of every 4 consecutive values, the 2:4 pattern of the sparse tensor cores. Nominal density is bn / (2·bm).

Storage, laid out for the GPU kernels (``kb`` = kept blocks per panel, equal for every panel and expert):

- ``values``    (E, out, kb·bw/2), dtype bf16 by default: for each row, the kept values of its panel's kept
  blocks in ascending block order; inside a block, 2 values per group of 4 columns, lower column first.
- ``meta``      (E, ceil(out/16), NS·64), uint8, with NS = ``meta_steps(kb, bw)`` = 2·ceil(kb·bw/64): the 2:4
  positions, stored as the per-thread metadata registers of the Hopper sparse MMA (``wgmma.mma_async.sp``
  m64nNk32, bf16), so that the kernel loads them as they are.

  Per row: the row's kept columns (its panel's kept blocks in ascending block order, kb·bw of them) form groups
  of 4, and each group q has a 4-bit nibble: bits 0-1 hold the position (0..3) of the first kept value, bits 2-3
  that of the second (first < second). Row byte i holds groups 2i (low nibble) and 2i+1 (high nibble), so 4 row
  bytes cover one MMA step of 32 kept columns (8 groups). Each row is padded to NS steps (an even count: two
  steps make the kernel's 64-column K tile) and the rows are padded to a multiple of 16, both with byte 0x44
  (nibble 0x4 = positions 0, 1: a valid pattern; the kernel pairs it with zero values).

  Interleaving: for each 16-row group G and step j, ``meta[e, G, 64·j : 64·j + 64]`` holds 16 slots of 4 bytes.
  Slot s = 2·g + t (g in 0..7, t in 0..1) is the little-endian uint32 whose low 16 bits are row bytes 4j + 2t and
  4j + 2t + 1 of row 16G + g (groups 8j + 4t .. 8j + 4t + 3, i.e. kept columns 32j + 16t .. 32j + 16t + 15: the
  step's column half t) and whose high 16 bits are the same two bytes of row 16G + g + 8. As an index map, padded
  row byte (row 16G + 8h + g, byte 4j + 2t + b) sits at ``meta[e, G, 64j + 8g + 4t + 2h + b]``, i.e. the padded
  (16·R16, 4·NS) bytes viewed as (R16, h 2, g 8, j NS, t 2, b 2) permuted to (R16, j, g, t, h, b). This is the
  register of the PTX sparse wgmma: in the 64-row tile at row 64m, lane l of warp w (G = 4m + w) reads slot
  2·(l/4) + (l&1) of step j, which holds rows 16G + l/4 and 16G + l/4 + 8, column half l&1.
- ``block_idx`` (E, P, kb), int32: the kept column-block indices of each panel, ascending (P = ceil(out/128),
  or 2·ceil(out/256) in the halves layout).

Halves layout (``halves=True``, for a stacked gate/up weight): each half of the rows is cut into panels from its own
first row, so row r < out/2 is in panel r // 128 and row r >= out/2 in panel P/2 + (r - out/2) // 128 (P =
2·ceil(out/256)): no panel mixes gate and up rows whatever the ffn, and gate panel m pairs with up panel m + P/2.
It needs out/2 a multiple of 16 (the metadata's row groups do not straddle the halves); values and meta are laid
out as always, and when out/2 is a multiple of 128 the storage is that of the plain layout.

Joint panels (``joint``): two panels may be made to choose the same kept blocks, so that one gathered token tile
serves both. ``"halves"`` pairs panel m with panel m + P/2 (a stacked gate/up weight: gate panel m with up panel
m; in the plain layout it needs ``out`` a multiple of 256, i.e. ffn a multiple of 128, in the halves layout any
ffn), ``"adjacent"`` pairs panels 2m and 2m + 1 (a last odd panel chooses alone). The storage is unchanged: paired
panels simply hold equal ``block_idx`` rows. The Hopper kernels read one gathered token tile for both weight boxes
of a tile whose panels are paired (hare/gpu/plan.py ``WeightFormat.kind``); a ``BlockNM`` built without saying
``joint`` finds the pairing its ``block_idx`` obeys (``detect_joint``).

The last panel (of each half, in the halves layout) may hold fewer than 128 rows (``out`` need not be a multiple of
128); ``in`` must be a multiple of ``bw``.
"""

from __future__ import annotations

import math

import torch

from ._checks import FLOAT_DTYPES, check_float, values_checkable
from .errors import InvalidArgumentError

PANEL = 128
GROUP = 4  # 2:4 sparsity: 2 kept of every 4
META_ROWS = 16  # rows per metadata row group: one warp's share of the m64 sparse wgmma
MMA_K = 32  # kept columns per sparse-MMA step (k32); a metadata step is 8 nibbles = 4 bytes per row
_META_PAD = 0x44  # padding byte: two nibbles 0x4 (positions 0, 1)
BLOCK_WIDTHS = (16, 32, 64)
MAX_BM = 64
DENSITIES = {0.5: (1, 1), 0.25: (1, 2), 0.1: (1, 5), 0.05: (1, 10)}  # density -> (bn, bm): the standard ratios
JOINT = (None, "halves", "adjacent")  # which panels choose their kept blocks together (see the module docstring)


def kept_blocks(num_blocks: int, bn: int, bm: int) -> int:
    """Blocks one panel keeps out of ``num_blocks``: bn per full window, ceil(r·bn/bm) in a partial one of r."""
    full, r = divmod(num_blocks, bm)
    return full * bn + math.ceil(r * bn / bm)


def meta_steps(kb: int, bw: int) -> int:
    """NS: the 32-column sparse-MMA steps of a row's kb·bw kept columns, padded to an even count."""
    return 2 * math.ceil(kb * bw / (2 * MMA_K))


def _pack_meta(nibbles: torch.Tensor, steps: int) -> torch.Tensor:
    """2:4 nibbles (E, out, n) of each row's n kept groups -> ``meta`` (E, ceil(out/16), steps·64) uint8,
    padding with 0x4 nibbles (see the module docstring)."""
    e, out, n = nibbles.shape
    r16 = math.ceil(out / META_ROWS)
    nib = nibbles.to(torch.uint8)
    rows = torch.full((e, r16 * META_ROWS, steps * 4), _META_PAD, dtype=torch.uint8, device=nibbles.device)
    rows[:, :out, :n // 2] = nib[..., 0::2] | (nib[..., 1::2] << 4)
    # (E, R16, h, g, j, t, b) -> (E, R16, j, g, t, h, b)
    return rows.reshape(e, r16, 2, 8, steps, 2, 2).permute(0, 1, 4, 3, 5, 2, 6).reshape(e, r16, steps * 64)


def _unpack_meta(meta: torch.Tensor, out: int, n: int) -> torch.Tensor:
    """``meta`` (E, ceil(out/16), NS·64) -> the 2:4 nibbles (E, out, n) uint8 of each row's n real kept groups."""
    e, r16, width = meta.shape
    steps = width // 64
    # (E, R16, j, g, t, h, b) -> (E, R16, h, g, j, t, b)
    rows = meta.reshape(e, r16, steps, 8, 2, 2, 2).permute(0, 1, 5, 3, 2, 4, 6).reshape(e, r16 * META_ROWS, steps * 4)
    b = rows[:, :out, :n // 2]
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def check_ratio(bn, bm, bw) -> None:
    for name, v in (("bn", bn), ("bm", bm), ("bw", bw)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgumentError(f"{name}: expected an int, got {v!r}")
    if not 1 <= bm <= MAX_BM:
        raise InvalidArgumentError(f"bm: expected 1 <= bm <= {MAX_BM}, got {bm}")
    if not 1 <= bn <= bm:
        raise InvalidArgumentError(f"bn: expected 1 <= bn <= bm = {bm}, got bn:bm = {bn}:{bm}")
    if bw not in BLOCK_WIDTHS:
        raise InvalidArgumentError(f"bw: expected one of {BLOCK_WIDTHS}, got {bw}")


def halves_fit(out: int) -> bool:
    """Whether a weight of ``out`` rows admits the halves layout: out even and out/2 a multiple of 16."""
    return out % 2 == 0 and (out // 2) % META_ROWS == 0


def _halves_pairing_fits(out: int, halves: bool) -> bool:
    """joint="halves" pairs panel m with m + P/2: P even with no panel straddling the halves (halves layout, or out
    a multiple of 256)."""
    return halves or out % (2 * PANEL) == 0


def check_layout(out: int, joint=None, halves: bool = False) -> None:
    """``joint`` (one of JOINT) and ``halves`` (a bool) fit a weight of ``out`` rows, else a clear error."""
    if not isinstance(halves, bool):
        raise InvalidArgumentError(f"halves: expected a bool, got {halves!r}")
    if halves and not halves_fit(out):
        raise InvalidArgumentError(f"halves=True cuts each half of the rows into panels, so out must be even with "
                                   f"out/2 a multiple of {META_ROWS} (a gate/up weight: ffn a multiple of "
                                   f"{META_ROWS}); got out = {out}")
    if joint not in JOINT:
        raise InvalidArgumentError(f"joint: expected one of {JOINT}, got {joint!r}")
    if joint == "halves" and not _halves_pairing_fits(out, halves):
        raise InvalidArgumentError(f"joint='halves' pairs panel m with panel m + P/2, so out must be a multiple of "
                                   f"{2 * PANEL} (a gate/up weight: ffn a multiple of {PANEL}), or the layout halves="
                                   f"True; got out = {out}")


JOINT_PANELS = {"gate_up": "halves", "down": "adjacent"}  # joint_panels=True: hare.sparsify's joint per weight


def expert_layout(part: str, out: int, joint_panels: bool) -> dict:
    """hare.sparsify's layout keywords (joint, halves) for an experts module's ``part`` ("gate_up" or "down") of
    ``out`` rows: gate/up is cut into panels per half (halves=True, so that gate panel m and up panel m are the
    Hopper kernels' tile m for any ffn; the same storage as the plain layout when ffn % 128 == 0) wherever its
    out/2 % 16 == 0 admits it (always when down, ffn columns wide, can be pruned); down keeps the plain layout.
    Joint gate/up panels need the halves layout."""
    halves = part == "gate_up" and halves_fit(out)
    if joint_panels and part == "gate_up" and not halves:
        raise InvalidArgumentError(f"joint_panels: gate panel m and up panel m pair in the halves layout, which needs "
                                   f"ffn a multiple of 16; got ffn = {out / 2:g}")
    return {"joint": JOINT_PANELS[part] if joint_panels else None, "halves": halves}


def detect_joint(block_idx: torch.Tensor, out: int, halves: bool = False) -> str | None:
    """The pairing (``"halves"`` first, then ``"adjacent"``) whose paired panels all keep the same blocks in
    ``block_idx`` (E, P, kb), among those that fit the layout and pair at least two panels; None if none does or the
    indices cannot be read (fake tensors). Reads the indices back (a host sync on a GPU)."""
    if not values_checkable(block_idx):
        return None
    panels = block_idx.shape[1]
    for joint in JOINT[1:]:
        if joint == "halves" and not _halves_pairing_fits(out, halves):
            continue
        partner = joint_partner(panels, joint, block_idx.device)
        if bool((partner != torch.arange(panels, device=block_idx.device)).any()) and \
                torch.equal(block_idx, block_idx[:, partner]):
            return joint
    return None


def panel_count(out: int, halves: bool = False) -> int:
    """P: the panels of a weight of ``out`` rows (ceil(out/128), or 2·ceil((out/2)/128) in the halves layout)."""
    return 2 * math.ceil(out // 2 / PANEL) if halves else math.ceil(out / PANEL)


def row_slots(out: int, halves: bool = False, device=None) -> torch.Tensor:
    """(out,) where each row sits in the grid of P panels of 128 row slots: its panel is slot // 128. The one map of
    rows to panels: r itself, or in the halves layout r for r < out/2 and 128·P/2 + (r − out/2) past it."""
    rows = torch.arange(out, device=device)
    if not halves:
        return rows
    half = out // 2
    return torch.where(rows < half, rows, rows + (PANEL * panel_count(out, True) // 2 - half))


def panel_of_rows(out: int, halves: bool = False, device=None) -> torch.Tensor:
    """(out,) the panel of each row (see ``row_slots``)."""
    return row_slots(out, halves, device) // PANEL


def _kept_group_index(block_idx: torch.Tensor, out: int, halves: bool, bw: int) -> torch.Tensor:
    """(..., out, kb·bw/4): the dense 4-column group index of each row's kept groups, ascending, from ``block_idx``
    (..., P, kb) and the row-to-panel map."""
    per_block = bw // GROUP
    blocks = block_idx.long()[..., panel_of_rows(out, halves, block_idx.device), :]  # (..., out, kb)
    return (blocks[..., None] * per_block + torch.arange(per_block, device=block_idx.device)).flatten(-2)


def joint_partner(panels: int, joint, device=None) -> torch.Tensor:
    """(P,) the panel each panel chooses its kept blocks with (itself when it chooses alone)."""
    p = torch.arange(panels, device=device)
    if joint == "halves":
        return (p + panels // 2) % panels
    if joint == "adjacent":
        return torch.where((p ^ 1) < panels, p ^ 1, p)
    return p


class BlockNM:
    """A Block N:M sparse weight (or stack of expert weights) in the compressed storage described above."""

    def __init__(self, values, meta, block_idx, *, shape, bn: int, bm: int, bw: int, joint: str | None = "auto",
                 halves: bool = False):
        """``joint``: one of JOINT, or "auto" (the default) for the pairing ``block_idx`` obeys (``detect_joint``)."""
        check_ratio(bn, bm, bw)
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise InvalidArgumentError(f"shape: expected (out, in) or (E, out, in) with positive sizes, got {shape}")
        experts, out, inp = (1, *shape) if len(shape) == 2 else shape
        check_layout(out, None if joint == "auto" else joint, halves)
        if inp % bw:
            raise InvalidArgumentError(f"shape: in = {inp} is not a multiple of bw = {bw}")
        kb = kept_blocks(inp // bw, bn, bm)
        panels = panel_count(out, halves)
        expected = {
            "values": ((experts, out, kb * bw // 2), FLOAT_DTYPES, values),
            "meta": ((experts, math.ceil(out / META_ROWS), meta_steps(kb, bw) * 64), (torch.uint8,), meta),
            "block_idx": ((experts, panels, kb), (torch.int32,), block_idx),
        }
        for name, (want_shape, dtypes, t) in expected.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != want_shape:
                raise InvalidArgumentError(f"{name}: expected shape {want_shape} for {shape} at {bn}:{bm}, bw {bw}; got {tuple(t.shape)}")
            if t.dtype not in dtypes:
                raise InvalidArgumentError(f"{name}: expected dtype in {dtypes}, got {t.dtype}")
        if not (values.device == meta.device == block_idx.device):
            raise InvalidArgumentError("values, meta and block_idx must be on one device")
        if joint == "auto":
            joint = detect_joint(block_idx, out, halves)
        self.values, self.meta, self.block_idx = values, meta, block_idx
        self.shape = torch.Size(shape)
        self.bn, self.bm, self.bw, self.joint, self.halves = bn, bm, bw, joint, halves

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def stacked(self) -> bool:
        return len(self.shape) == 3

    @property
    def num_experts(self) -> int:
        return self.values.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def kept_blocks(self) -> int:
        return self.block_idx.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def params(self) -> dict:
        """The keyword arguments that rebuild this weight from its storage and shape: bn, bm, bw, joint, halves."""
        return {"bn": self.bn, "bm": self.bm, "bw": self.bw, "joint": self.joint, "halves": self.halves}

    @property
    def density(self) -> float:
        """Fraction of the dense weight's entries stored (bn / (2·bm) when ``in`` fills whole windows)."""
        return self.kept_blocks * self.bw / 2 / self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed storage: values, 2:4 metadata and block indices."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.block_idx))

    def __repr__(self) -> str:
        joint = f", joint={self.joint}" if self.joint else ""
        joint += ", halves=True" if self.halves else ""
        return (f"BlockNM(shape={tuple(self.shape)}, {self.bn}:{self.bm}, bw={self.bw}{joint}, "
                f"density={self.density:.4f}, dtype={self.dtype}, device={self.device})")

    def to(self, device=None, dtype=None) -> "BlockNM":
        """Move the storage to ``device`` and/or cast the values to ``dtype`` (metadata and indices keep theirs)."""
        return BlockNM(self.values.to(device=device, dtype=dtype), self.meta.to(device), self.block_idx.to(device),
                       shape=self.shape, **self.params)

    def select_experts(self, start: int, stop: int) -> "BlockNM":
        """The stacked experts [start, stop) (views, no copy), e.g. one rank's shard for expert parallelism."""
        if not self.stacked or not 0 <= start < stop <= self.num_experts:
            raise InvalidArgumentError(f"select_experts: need a stacked weight and 0 <= start < stop <= {self.num_experts}, "
                                       f"got [{start}, {stop}) of shape {tuple(self.shape)}")
        return BlockNM(self.values[start:stop], self.meta[start:stop], self.block_idx[start:stop],
                       shape=(stop - start, *self.shape[1:]), **self.params)

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _kept_groups(self):
        """Per row: the dense group index (E, out, n) of each kept 4-column group and its two positions (E, out, n, 2)."""
        groups = _kept_group_index(self.block_idx, self.out_features, self.halves, self.bw)
        nibbles = _unpack_meta(self.meta, self.out_features, groups.shape[-1]).long()  # (E, out, n)
        pos = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
        return groups, pos

    def _scatter(self, src: torch.Tensor) -> torch.Tensor:
        groups, pos = self._kept_groups()
        e, out, inp = self.num_experts, self.out_features, self.in_features
        dense = torch.zeros(e, out, inp // GROUP, GROUP, dtype=src.dtype, device=self.device)
        rows = dense.gather(2, groups[..., None].expand(-1, -1, -1, GROUP))
        rows.scatter_(3, pos, src.reshape(e, out, -1, 2))
        dense.scatter_(2, groups[..., None].expand(-1, -1, -1, GROUP), rows)
        dense = dense.reshape(e, out, inp)
        return dense if self.stacked else dense[0]

    def to_dense(self) -> torch.Tensor:
        """The exact dense weight: stored values in place, zeros elsewhere (values' dtype)."""
        return self._scatter(self.values)

    def mask(self) -> torch.Tensor:
        """Boolean mask of the kept entries, of the dense weight's shape."""
        return self._scatter(torch.ones_like(self.values, dtype=torch.bool))

    def check(self) -> None:
        """Check the stored indices obey the format (reads values back; used when loading untrusted files)."""
        if not values_checkable(self.block_idx):
            return
        num_blocks = self.in_features // self.bw
        idx = self.block_idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_blocks):
            raise InvalidArgumentError(f"block_idx: indices must lie in [0, {num_blocks})")
        if bool((idx[..., 1:] <= idx[..., :-1]).any()):
            raise InvalidArgumentError("block_idx: indices must be strictly ascending within each panel")
        window = idx // self.bm
        per_window = torch.zeros(*idx.shape[:-1], math.ceil(num_blocks / self.bm), dtype=torch.long, device=idx.device)
        per_window.scatter_add_(-1, window, torch.ones_like(window))
        full, r = divmod(num_blocks, self.bm)
        allowed = torch.full_like(per_window[0, 0], self.bn)
        if r:
            allowed[-1] = math.ceil(r * self.bn / self.bm)
        if bool((per_window != allowed).any()):
            raise InvalidArgumentError(f"block_idx: each window of {self.bm} blocks must keep {self.bn} blocks")
        if not torch.equal(idx, idx[:, joint_partner(idx.shape[1], self.joint, idx.device)]):
            raise InvalidArgumentError(f"block_idx: joint={self.joint!r}, but paired panels keep different blocks")
        nibbles = _unpack_meta(self.meta, self.out_features, self.kept_blocks * self.bw // GROUP)
        if bool(((nibbles & 3) >= (nibbles >> 2)).any()):
            raise InvalidArgumentError("meta: each 2:4 nibble must hold two ascending positions")
        # the real nibbles round-trip exactly, so any difference lies in the padding
        if not torch.equal(_pack_meta(nibbles, self.meta.shape[-1] // 64), self.meta):
            raise InvalidArgumentError("meta: padding nibbles (past the last kept column or row) must be 0x4 "
                                       "(positions 0, 1)")


def _check_sparsify_args(weight, score, bn, bm, bw) -> torch.Tensor:
    check_float("weight", weight, ndim=(2, 3))
    check_ratio(bn, bm, bw)
    if min(weight.shape) < 1:
        raise InvalidArgumentError(f"weight: expected positive sizes, got shape {tuple(weight.shape)}")
    if weight.shape[-1] % bw:
        raise InvalidArgumentError(f"weight: in = {weight.shape[-1]} is not a multiple of bw = {bw}; pad the input dimension")
    if values_checkable(weight) and not bool(torch.isfinite(weight).all()):
        raise InvalidArgumentError("weight: contains NaN or Inf")
    if score is None:
        return weight.abs()
    check_float("score", score)
    if score.shape != weight.shape:
        raise InvalidArgumentError(f"score: expected the weight's shape {tuple(weight.shape)}, got {tuple(score.shape)}")
    if score.device != weight.device:
        raise InvalidArgumentError(f"score: on {score.device}, weight on {weight.device}")
    if values_checkable(score):
        if bool(torch.isnan(score).any()):
            raise InvalidArgumentError("score: contains NaN")
        if bool((score < 0).any()):
            raise InvalidArgumentError("score: must be nonnegative")
    return score


def _select_one(score: torch.Tensor, bn: int, bm: int, bw: int, joint, halves: bool):
    """Optimal mask of one (out, in) score matrix: returns (pos (out, G, 2), block_idx (P, kb))."""
    out, inp = score.shape
    groups = score.reshape(out, inp // GROUP, GROUP).float()
    top2 = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    pos = top2.sort(dim=-1).values
    group_score = groups.gather(-1, top2).sum(-1, dtype=torch.float64)  # best 2:4 score of each group
    num_blocks = inp // bw
    block_score = group_score.reshape(out, num_blocks, bw // GROUP).sum(-1)
    panels = panel_count(out, halves)
    # each panel sums its own rows (a short panel: fewer), in a fixed order: the rows laid in the panels' row slots
    slotted = block_score.new_zeros(panels * PANEL, num_blocks).index_copy_(0, row_slots(out, halves, score.device),
                                                                            block_score)
    panel_score = slotted.reshape(panels, PANEL, num_blocks).sum(1)  # (P, num_blocks)
    partner = joint_partner(panels, joint, score.device)
    # a pair is worth the sum of its panels' scores; both get the same sum (a + b == b + a), so the same blocks
    panel_score = panel_score + torch.where((partner != torch.arange(panels, device=score.device))[:, None],
                                            panel_score[partner], 0.0)

    windows = math.ceil(num_blocks / bm)
    padded = torch.nn.functional.pad(panel_score, (0, windows * bm - num_blocks), value=-1.0)  # scores are >= 0
    rank = torch.empty_like(padded, dtype=torch.long).reshape(panels, windows, bm)
    order = torch.sort(padded.reshape(panels, windows, bm), dim=-1, descending=True, stable=True).indices
    rank.scatter_(-1, order, torch.arange(bm, device=score.device).expand_as(order))
    keep = torch.full((windows,), bn, device=score.device)
    r = num_blocks % bm
    if r:
        keep[-1] = math.ceil(r * bn / bm)
    chosen = (rank < keep[:, None]).reshape(panels, windows * bm)[:, :num_blocks]
    index = torch.arange(num_blocks, device=score.device).expand(panels, -1)
    kb = kept_blocks(num_blocks, bn, bm)
    block_idx = torch.where(chosen, index, num_blocks).sort(dim=-1).values[:, :kb]
    return pos, block_idx


def sparsify(weight: torch.Tensor, *, bn: int, bm: int, bw: int = 16, score: torch.Tensor | None = None,
             dtype: torch.dtype = torch.bfloat16, joint: str | None = None, halves: bool = False) -> BlockNM:
    """Prune ``weight`` (out, in) or (E, out, in) to Block N:M with the mask of highest total ``score``.

    ``score`` (default |weight|) is any nonnegative importance of the weight's shape, e.g. |w|·‖x_col‖ from
    calibration activations. The mask is optimal: a block is worth the sum over the panel's rows of the best 2:4
    score inside it, and each window keeps its ``bn`` most valuable blocks (the last, partial window of r blocks
    keeps ceil(r·bn/bm)). Ties go to the lower index. Values are stored in ``dtype`` (bf16 unless asked).
    ``joint`` (``"halves"`` for a stacked gate/up weight, ``"adjacent"`` for down; see the module docstring) makes
    pairs of panels keep the same blocks; the mask stays optimal under that constraint (a pair's block is worth the
    sum over both panels; the 2:4 choice stays per row). ``halves=True`` cuts each half of the rows into panels from
    its own first row (a stacked gate/up weight whose ffn is not a multiple of 128; see the module docstring).

    On a GPU it returns once the storage is written, so the result is safe to use on any stream (benchmarks and
    CUDA-graph captures run on side streams that do not wait for the stream sparsify ran on).
    """
    score = _check_sparsify_args(weight, score, bn, bm, bw)
    check_layout(weight.shape[-2], joint, halves)
    if dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"dtype: expected a floating dtype, got {dtype}")
    w3, s3 = (weight, score) if weight.dim() == 3 else (weight[None], score[None])
    out, inp = w3.shape[-2:]
    values, metas, indices = [], [], []
    for w, s in zip(w3, s3):  # one expert at a time bounds the memory of the selection
        pos, block_idx = _select_one(s, bn, bm, bw, joint, halves)
        groups = _kept_group_index(block_idx, out, halves, bw)
        kept_pos = pos.gather(1, groups[..., None].expand(-1, -1, 2))  # (out, n, 2)
        kept = w.reshape(out, inp // GROUP, GROUP).gather(1, groups[..., None].expand(-1, -1, GROUP))
        values.append(kept.gather(2, kept_pos).reshape(out, -1).to(dtype))
        nibble = kept_pos[..., 0] | (kept_pos[..., 1] << 2)
        metas.append(_pack_meta(nibble[None], meta_steps(block_idx.shape[-1], bw))[0])
        indices.append(block_idx.to(torch.int32))
    result = BlockNM(torch.stack(values), torch.stack(metas), torch.stack(indices),
                     shape=weight.shape, bn=bn, bm=bm, bw=bw, joint=joint, halves=halves)
    if result.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(result.device).synchronize()
    return result
