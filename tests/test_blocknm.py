import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hare
from hare.blocknm import PANEL, kept_blocks, meta_steps, panel_count, panel_of_rows

RATIOS = [(1, 1), (1, 2), (1, 5), (1, 10), (2, 5)]


def panel_rows(out: int, halves: bool = False) -> list[range]:
    """The rows of each panel, from the format's definition: 128-row panels from row 0, or with ``halves`` from the
    first row of each half (the last panel of each half may be short)."""
    starts = [(0, out)] if not halves else [(0, out // 2), (out // 2, out)]
    return [range(a, min(a + PANEL, b)) for a, b in starts for a in range(a, b, PANEL)]


def check_structure(mask: torch.Tensor, bn: int, bm: int, bw: int, halves: bool = False):
    """The mask obeys Hierarchical Block N:M: shared kept blocks per panel, bn per window, 2:4 inside kept blocks."""
    m = mask if mask.dim() == 3 else mask[None]
    e, out, inp = m.shape
    nblk = inp // bw
    per_group = m.reshape(e, out, inp // 4, 4).sum(-1)
    per_block = m.reshape(e, out, nblk, bw).sum(-1)
    for panel in panel_rows(out, halves):
        rows = per_block[:, panel.start:panel.stop]
        kept = rows > 0
        assert (kept == kept[:, :1]).all(), "kept blocks differ between rows of a panel"
        assert ((rows == bw // 2) | (rows == 0)).all()
        for w0 in range(0, nblk, bm):
            r = min(bm, nblk - w0)
            want = bn if r == bm else math.ceil(r * bn / bm)
            assert (kept[:, 0, w0:w0 + r].sum(-1) == want).all()
    assert ((per_group == 0) | (per_group == 2)).all(), "a group is not 2:4"


@pytest.mark.parametrize("bn,bm", RATIOS)
@pytest.mark.parametrize("bw", [16, 32, 64])
@pytest.mark.parametrize("shape", [(3, 200, 320), (130, 192), (1, 5, 64 * 7)])
def test_round_trip_and_structure(bn, bm, bw, shape, gen):
    w = torch.randn(*shape, generator=gen)
    s = hare.sparsify(w, bn=bn, bm=bm, bw=bw, dtype=torch.float32)
    mask = s.mask()
    assert mask.shape == w.shape and s.shape == w.shape
    assert torch.equal(s.to_dense(), w * mask), "to_dense must be exact"
    check_structure(mask, bn, bm, bw)
    nblk = shape[-1] // bw
    assert s.kept_blocks == kept_blocks(nblk, bn, bm)
    assert s.density == pytest.approx(mask.float().mean().item())
    if nblk % bm == 0:
        assert s.density == pytest.approx(bn / (2 * bm))
    s.check()


def test_bf16_storage_is_default_and_exact(gen):
    w = torch.randn(2, 128, 64, generator=gen)
    s = hare.sparsify(w, bn=1, bm=2)
    assert s.values.dtype == torch.bfloat16
    assert torch.equal(s.to_dense(), (w * s.mask()).to(torch.bfloat16))
    s64 = hare.sparsify(w.double(), bn=1, bm=2, dtype=torch.float64)
    assert torch.equal(s64.to_dense(), w.double() * s64.mask())
    assert torch.equal(s64.mask(), s.mask())


def test_nbytes_counts_values_meta_and_indices(gen):
    s = hare.sparsify(torch.randn(4, 256, 512, generator=gen), bn=1, bm=2, bw=16)
    kb = 512 // 16 // 2
    assert s.nbytes == 4 * 256 * kb * 8 * 2 + 4 * 256 * kb * 2 + 4 * 2 * kb * 4
    # bf16 at 25%: values 0.5 B + metadata 0.0625 B per dense weight, plus the small block index
    assert s.nbytes / (4 * 256 * 512 * 2) == pytest.approx(0.5625 / 2, rel=0.01)
    # the metadata is padded to 16-row groups and an even count of 32-column steps: 40 rows x 48 kept columns
    # store 3 groups x 2 steps x 64 bytes
    t = hare.sparsify(torch.randn(40, 48, generator=gen), bn=1, bm=1, bw=16)
    assert t.nbytes == 40 * 24 * 2 + 3 * 2 * 64 + 1 * 3 * 4


def best_pair(scores4: torch.Tensor) -> torch.Tensor:
    return torch.stack([scores4[..., a] + scores4[..., b] for a, b in itertools.combinations(range(4), 2)]).amax(0)


def brute_force_best(score: torch.Tensor, bn: int, bm: int, bw: int, halves: bool = False) -> float:
    """Exhaustive search over all kept-block sets of every panel; the best 2:4 pair in each group by enumeration."""
    out, inp = score.shape
    group_best = best_pair(score.double().reshape(out, inp // 4, 4))
    block_val = group_best.reshape(out, inp // bw, bw // 4).sum(-1)
    nblk = inp // bw
    total = 0.0
    for panel in panel_rows(out, halves):
        vals = block_val[panel.start:panel.stop].sum(0)
        choices = []
        for w0 in range(0, nblk, bm):
            r = min(bm, nblk - w0)
            keep = bn if r == bm else math.ceil(r * bn / bm)
            choices.append(list(itertools.combinations(range(w0, w0 + r), keep)))
        total += max(sum(float(vals[list(b)].sum()) for b in combo) for combo in itertools.product(*choices))
    return total


@pytest.mark.parametrize("bn,bm", RATIOS)
@pytest.mark.parametrize("bw", [16, 32])
@pytest.mark.parametrize("halves,outs", [(False, (3, 130)), (True, (384, 96, 320))])
def test_mask_is_optimal(bn, bm, bw, halves, outs, gen):
    # halves: out/2 = 192 (% 128 == 64: a 64-row panel per half), 48 (one short panel per half), 160 (128 + 32)
    for out in outs:
        nblk = 11 if bw == 16 else 7
        score = torch.rand(out, nblk * bw, generator=gen) ** 3
        s = hare.sparsify(torch.randn(out, nblk * bw, generator=gen), bn=bn, bm=bm, bw=bw, score=score, halves=halves)
        check_structure(s.mask(), bn, bm, bw, halves)
        got = float((score.double() * s.mask()).sum())
        assert got == pytest.approx(brute_force_best(score, bn, bm, bw, halves), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(e=st.integers(1, 3), out=st.integers(1, 300), nblk=st.integers(1, 24),
       ratio=st.sampled_from(RATIOS + [(3, 4), (1, 3)]), bw=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**31),
       halves=st.booleans())
def test_property_any_shape(e, out, nblk, ratio, bw, seed, halves):
    if halves:
        out = 32 * (out % 20 + 1)  # out/2 a multiple of 16: 16 .. 320 rows per half
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, out, nblk * bw, generator=g)
    bn, bm = ratio
    s = hare.sparsify(w, bn=bn, bm=bm, bw=bw, dtype=torch.float32, halves=halves)
    mask = s.mask()
    check_structure(mask, bn, bm, bw, halves)
    s.check()
    assert torch.equal(s.to_dense(), w * mask)
    # magnitude criterion: inside every kept group, the kept pair holds the two largest |w|
    kept = mask.reshape(e, out, -1, 4).any(-1)
    mag = w.abs().reshape(e, out, -1, 4)[kept]
    chosen = (w.abs() * mask).reshape(e, out, -1, 4)[kept].sum(-1)
    assert torch.allclose(chosen, mag.topk(2, dim=-1).values.sum(-1))


def test_score_steers_the_mask(gen):
    w = torch.randn(128, 64, generator=gen)
    score = torch.zeros_like(w)
    score[:, 16:32] = 1.0  # only block 1 matters
    s = hare.sparsify(w, bn=1, bm=4, bw=16, score=score)
    assert s.block_idx.flatten().tolist() == [1]


def test_to_device_and_dtype(gen):
    s = hare.sparsify(torch.randn(2, 128, 64, generator=gen), bn=1, bm=2)
    t = s.to("cpu", torch.float32)
    assert t.values.dtype == torch.float32 and torch.equal(t.to_dense(), s.to_dense().float())
    assert "1:2" in repr(s)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bn=1, bm=2, bw=16, weight=torch.randn(4, 40)), "multiple of bw"),
    (dict(bn=3, bm=2), "bn"),
    (dict(bn=0, bm=2), "bn"),
    (dict(bn=1, bm=0), "bm"),
    (dict(bn=1, bm=2, bw=8), "bw"),
    (dict(bn=1.0, bm=2), "bn"),
    (dict(bn=1, bm=2, weight=torch.ones(4, 64, dtype=torch.int32)), "weight"),
    (dict(bn=1, bm=2, weight=torch.ones(64)), "weight"),
    (dict(bn=1, bm=2, weight=torch.full((4, 64), float("nan"))), "NaN"),
    (dict(bn=1, bm=2, score=-torch.ones(4, 64)), "nonnegative"),
    (dict(bn=1, bm=2, score=torch.full((4, 64), float("nan"))), "score"),
    (dict(bn=1, bm=2, score=torch.ones(4, 32)), "score"),
])
def test_sparsify_errors(kwargs, match):
    kwargs.setdefault("weight", torch.randn(4, 64))
    weight = kwargs.pop("weight")
    with pytest.raises(hare.InvalidArgumentError, match=match):
        hare.sparsify(weight, **kwargs)


def test_constructor_rejects_inconsistent_parts(gen):
    s = hare.sparsify(torch.randn(128, 64, generator=gen), bn=1, bm=2)
    with pytest.raises(hare.InvalidArgumentError, match="values"):
        hare.BlockNM(s.values[:, :-1], s.meta, s.block_idx, shape=s.shape, bn=1, bm=2, bw=16)
    with pytest.raises(hare.InvalidArgumentError, match="meta"):
        hare.BlockNM(s.values, s.meta.int(), s.block_idx, shape=s.shape, bn=1, bm=2, bw=16)
    with pytest.raises(hare.InvalidArgumentError, match="meta"):  # the old (E, out, kb·bw/8) layout
        hare.BlockNM(s.values, torch.zeros(1, 128, 4, dtype=torch.uint8), s.block_idx, shape=s.shape, bn=1, bm=2, bw=16)
    bad = s.block_idx.clone()
    bad[..., 0] = 99
    with pytest.raises(hare.InvalidArgumentError, match="block_idx"):
        hare.BlockNM(s.values, s.meta, bad, shape=s.shape, bn=1, bm=2, bw=16).check()


# ---- the 2:4 metadata layout (sparse-wgmma registers) ----------------------------------------------------------

def test_meta_steps():
    # NS: 32-column steps of kb·bw kept columns, rounded up to an even count
    assert [meta_steps(kb, bw) for kb, bw in [(1, 16), (3, 16), (4, 16), (5, 16), (8, 16), (2, 32), (5, 32), (3, 64)]] \
        == [2, 2, 2, 4, 4, 2, 6, 6]


def meta_offset(row: int, byte: int) -> tuple[int, int]:
    """Where the layout puts byte ``byte`` of row ``row``'s nibble bytes: (16-row group, offset in it)."""
    j, t, b = byte // 4, byte % 4 // 2, byte % 2
    h, g = row % 16 // 8, row % 8
    return row // 16, 64 * j + 8 * g + 4 * t + 2 * h + b


def expected_nibbles(w: torch.Tensor, s: hare.BlockNM) -> torch.Tensor:
    """Each row's nibbles (E, out, n), from the weight alone: the kept blocks of block_idx, in each kept group the
    two largest |w| (the magnitude criterion; randn has no ties). Also checks the mask they imply is s.mask()."""
    w3 = w if w.dim() == 3 else w[None]
    e, out, inp = w3.shape
    bw = s.bw
    mask = torch.zeros(e, out, inp // 4, 4, dtype=torch.bool)
    nib = torch.zeros(e, out, s.kept_blocks * bw // 4, dtype=torch.long)
    panel_of = {r: p for p, rows in enumerate(panel_rows(out, s.halves)) for r in rows}
    for x in range(e):
        for r in range(out):
            q = 0
            for blk in s.block_idx[x, panel_of[r]].tolist():
                for grp in range(blk * bw // 4, (blk + 1) * bw // 4):
                    p0, p1 = sorted(w3[x, r, 4 * grp:4 * grp + 4].abs().topk(2).indices.tolist())
                    mask[x, r, grp, [p0, p1]] = True
                    nib[x, r, q] = p0 | (p1 << 2)
                    q += 1
    assert torch.equal(s.mask(), mask.reshape(w.shape)), "mask disagrees with the independent decode"
    return nib


LAYOUT_CASES = [  # (shape, bn, bm, bw): odd step counts, partial windows, out not a multiple of 16
    ((2, 40, 48), 1, 1, 16),   # kb = 3: 48 kept columns, NS = 2 (one padding half step)
    ((2, 40, 48), 1, 5, 16),   # one partial window: kb = 1, 16 kept columns of 64
    ((40, 160), 1, 1, 32),     # kb = 5: 160 kept columns, 5 real steps padded to NS = 6
    ((1, 17, 112), 1, 2, 16),  # kb = 4, 17 rows: a 16-row group of 1 real row
    ((2, 130, 448), 2, 5, 64),  # kb = 3 (2 + ceil(2·2/5)): 192 kept columns, two panels
    ((3, 32, 640), 1, 10, 32),  # kb = 2: 64 kept columns, no padding at all
]
HALVES_LAYOUT_CASES = [  # (shape, bn, bm, bw) in the halves layout
    ((2, 96, 48), 1, 1, 16),     # 48 rows per half: one short panel each, a 16-row group on each side of the middle
    ((2, 384, 160), 1, 2, 32),   # 192 rows per half (% 128 == 64): panels of 128, 64, 128, 64 rows; kb = 3, NS = 4
]


@pytest.mark.parametrize("shape,bn,bm,bw,halves", [(*c, False) for c in LAYOUT_CASES] +
                         [(*c, True) for c in HALVES_LAYOUT_CASES])
def test_meta_layout(shape, bn, bm, bw, halves, gen):
    w = torch.randn(*shape, generator=gen)
    s = hare.sparsify(w, bn=bn, bm=bm, bw=bw, dtype=torch.float32, halves=halves)
    # (a) exact round trip, as before
    assert torch.equal(s.to_dense(), w * s.mask())
    s.check()
    e, out = s.num_experts, s.out_features
    kb, ns, r16 = s.kept_blocks, meta_steps(s.kept_blocks, bw), math.ceil(out / 16)
    n = kb * bw // 4
    assert s.meta.shape == (e, r16, ns * 64) and s.meta.dtype == torch.uint8 and s.meta.is_contiguous()
    nib = expected_nibbles(w, s)
    meta = s.meta.tolist()

    def want(x, r, grp):  # nibble of group grp of row r; 0x4 past the real rows and groups
        return nib[x, r, grp].item() if r < out and grp < n else 4

    # (b) + (c) every slot decoded by hand, padding rows and steps included
    for x in range(e):
        for r in range(r16 * 16):
            for j in range(ns):
                for t in range(2):
                    at = j * 64 + (2 * (r % 16 % 8) + t) * 4
                    word = int.from_bytes(bytes(meta[x][r // 16][at:at + 4]), "little")
                    half = word >> 16 if r % 16 >= 8 else word & 0xFFFF
                    groups = range(8 * j + 4 * t, 8 * j + 4 * t + 4)
                    assert half == sum(want(x, r, grp) << 4 * k for k, grp in enumerate(groups)), (x, r, j, t)

    # (d) check() rejects a real nibble with equal positions ...
    gen_r = torch.Generator().manual_seed(hash((shape, bn, bm, bw)) % 2**31)
    x, r, q = (int(torch.randint(0, m, (1,), generator=gen_r)) for m in (e, out, n))
    bad = s.meta.clone()
    grp16, off = meta_offset(r, q // 2)
    shift = 4 * (q % 2)
    bad[x, grp16, off] = (int(bad[x, grp16, off]) & ~(0xF << shift)) | (0x5 << shift)  # positions 1, 1
    with pytest.raises(hare.InvalidArgumentError, match="ascending"):
        hare.BlockNM(s.values, bad, s.block_idx, shape=s.shape, **s.params).check()
    # ... and a padding nibble that is not 0x4, even a valid pattern (positions 1, 2), in a padding column or row
    pads = ([(r, n // 2)] if n < ns * 8 else []) + ([(out, 0)] if out % 16 else [])
    for row, byte in pads:
        bad = s.meta.clone()
        grp16, off = meta_offset(row, byte)
        bad[x, grp16, off] = 0x94
        with pytest.raises(hare.InvalidArgumentError, match="padding"):
            hare.BlockNM(s.values, bad, s.block_idx, shape=s.shape, **s.params).check()
    # selecting experts keeps the layout (E stays first)
    if s.stacked and e > 1:
        part = s.select_experts(1, e)
        assert torch.equal(part.meta, s.meta[1:]) and torch.equal(part.to_dense(), s.to_dense()[1:])


@pytest.mark.parametrize("out", [32, 96, 256, 320, 384, 640])
def test_halves_row_to_panel_map(out):
    """panel of row r = r // 128 for r < out/2, else P/2 + (r - out/2) // 128, with P = 2·ceil((out/2)/128)."""
    half = out // 2
    panels = 2 * math.ceil(half / PANEL)
    want = [r // PANEL if r < half else panels // 2 + (r - half) // PANEL for r in range(out)]
    assert panel_count(out, True) == panels and panel_of_rows(out, True).tolist() == want
    assert [p for p, rows in enumerate(panel_rows(out, True)) for _ in rows] == want
    assert panel_count(out) == math.ceil(out / PANEL) and panel_of_rows(out).tolist() == [r // PANEL for r in range(out)]


def test_halves_layout_panels_choose_from_their_own_rows(gen):
    """ffn 192 (out 384): panels of 128, 64 (gate), 128, 64 (up) rows, each choosing its blocks from its rows alone."""
    w = torch.randn(3, 384, 160, generator=gen) * torch.rand(3, 384, 1, generator=gen)
    s = hare.sparsify(w, bn=1, bm=5, bw=16, dtype=torch.float32, halves=True)
    plain = hare.sparsify(w, bn=1, bm=5, bw=16, dtype=torch.float32)
    assert s.halves and not plain.halves and s.block_idx.shape == (3, 4, 2) and plain.block_idx.shape == (3, 3, 2)
    assert s.values.shape == plain.values.shape and s.meta.shape == plain.meta.shape
    for p, rows in enumerate(panel_rows(384, True)):  # the mask is optimal panel by panel: as if pruned alone
        alone = hare.sparsify(w[:, rows.start:rows.stop], bn=1, bm=5, bw=16, dtype=torch.float32)
        assert torch.equal(s.block_idx[:, p], alone.block_idx[:, 0])
        assert torch.equal(s.to_dense()[:, rows.start:rows.stop], alone.to_dense())
    mask = s.mask()
    assert torch.equal(s.to_dense(), w * mask)
    check_structure(mask, 1, 5, 16, halves=True)
    with pytest.raises(AssertionError, match="kept blocks differ"):
        check_structure(mask, 1, 5, 16)  # plain panel 1 (rows 128-255) straddles gate and up: not one choice
    s.check()
    assert "halves=True" in repr(s) and "halves" not in repr(plain)
    moved, part = s.to(dtype=torch.bfloat16), s.select_experts(1, 3)
    assert moved.halves and torch.equal(moved.mask(), mask)
    assert part.halves and torch.equal(part.to_dense(), s.to_dense()[1:3])


@pytest.mark.parametrize("out", [256, 512, 768])
@pytest.mark.parametrize("joint", [None, "halves", "adjacent"])
def test_halves_storage_is_the_plain_one_when_half_is_a_multiple_of_128(out, joint, gen):
    w = torch.randn(2, out, 96, generator=gen) * torch.rand(2, out, 1, generator=gen)
    score = torch.rand(2, out, 96, generator=gen) ** 4
    a = hare.sparsify(w, bn=1, bm=2, bw=16, score=score, joint=joint, halves=True)
    b = hare.sparsify(w, bn=1, bm=2, bw=16, score=score, joint=joint)
    assert torch.equal(a.values.view(torch.int16), b.values.view(torch.int16))  # bitwise
    assert torch.equal(a.meta, b.meta) and torch.equal(a.block_idx, b.block_idx)
    assert (a.halves, b.halves) == (True, False)


def test_halves_errors(gen):
    w = torch.randn(40, 64, generator=gen)  # out/2 = 20: its 16-row metadata groups would straddle the halves
    for bad_out in (40, 97):
        with pytest.raises(hare.InvalidArgumentError, match=r"halves=True .*out must be even with out/2 a multiple of 16"
                                                            rf".*got out = {bad_out}"):
            hare.sparsify(torch.randn(bad_out, 64, generator=gen), bn=1, bm=2, halves=True)
    with pytest.raises(hare.InvalidArgumentError, match="halves: expected a bool"):
        hare.sparsify(w, bn=1, bm=2, halves=1)
    s = hare.sparsify(torch.randn(2, 384, 64, generator=gen), bn=1, bm=2)  # plain: 3 panels
    with pytest.raises(hare.InvalidArgumentError, match=r"block_idx: expected shape \(2, 4, 2\)"):
        hare.BlockNM(s.values, s.meta, s.block_idx, shape=s.shape, bn=1, bm=2, bw=16, halves=True)
    with pytest.raises(hare.InvalidArgumentError, match="halves=True"):
        hare.BlockNM(s.values[:, :40], s.meta[:, :3], s.block_idx[:, :1], shape=(2, 40, 64), bn=1, bm=2, bw=16,
                     halves=True)
