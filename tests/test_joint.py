"""Joint panels (``hare.sparsify(..., joint=...)``): optimal under the pairing, exact, checked, saved, and plumbed
through hare.patch, the CLI and the reconstruction pruner."""

import itertools
import json
import math

import pytest
import torch

import hare
from hare.blocknm import PANEL, joint_partner
from hare.checkpoint import load, save
from hare.errors import CheckpointError, InvalidArgumentError
from hare.reconstruct import reconstruct

from helpers import edit_hare_file
from test_blocknm import best_pair, check_structure, panel_rows


def _panel_choices(nblk: int, bn: int, bm: int) -> list[tuple]:
    """Every kept-block set one panel may choose: a combination per window, all windows together."""
    windows = [list(itertools.combinations(range(w0, w0 + min(bm, nblk - w0)),
                                           bn if nblk - w0 >= bm else math.ceil((nblk - w0) * bn / bm)))
               for w0 in range(0, nblk, bm)]
    return [sum(combo, ()) for combo in itertools.product(*windows)]


def brute_force_joint_best(score: torch.Tensor, bn: int, bm: int, bw: int, joint, halves: bool = False) -> float:
    """Exhaustive: every assignment of kept-block sets to all panels, kept only if it obeys ``joint``."""
    out, inp = score.shape
    nblk = inp // bw
    block_val = best_pair(score.double().reshape(out, inp // 4, 4)).reshape(out, nblk, bw // 4).sum(-1)
    vals = [block_val[rows.start:rows.stop].sum(0) for rows in panel_rows(out, halves)]
    panels = len(vals)
    partner = joint_partner(panels, joint).tolist()
    best = -1.0
    for assign in itertools.product(_panel_choices(nblk, bn, bm), repeat=panels):
        if all(assign[p] == assign[partner[p]] for p in range(panels)):
            best = max(best, sum(float(vals[p][list(assign[p])].sum()) for p in range(panels)))
    return best


@pytest.mark.parametrize("joint,out,halves", [
    ("halves", 512, False), ("adjacent", 384, False), ("adjacent", 300, False), (None, 256, False),
    # the halves layout: ffn 192 (% 128 == 64: panels of 128, 64, 128, 64 rows), 48 and 160 (off 128)
    ("halves", 384, True), ("halves", 96, True), ("halves", 320, True), ("adjacent", 384, True), (None, 320, True)])
@pytest.mark.parametrize("bn,bm,nblk", [(1, 2, 5), (2, 3, 4)])
def test_joint_mask_is_optimal(joint, out, halves, bn, bm, nblk, gen):
    bw = 16
    score = torch.rand(out, nblk * bw, generator=gen) ** 4  # heavy-tailed: panels disagree on their best blocks
    s = hare.sparsify(score, bn=bn, bm=bm, bw=bw, score=score, dtype=torch.float64, joint=joint, halves=halves)
    check_structure(s.mask(), bn, bm, bw, halves)
    s.check()
    got = float((score.double() * s.mask()).sum())
    assert got == pytest.approx(brute_force_joint_best(score, bn, bm, bw, joint, halves), rel=1e-12)


def test_joint_pairs_panels_and_keeps_values_exact(gen):
    w = torch.randn(3, 4 * PANEL, 160, generator=gen) * torch.rand(3, 4 * PANEL, 1, generator=gen)
    alone = hare.sparsify(w, bn=1, bm=5, bw=16, dtype=torch.float32)
    for joint, pairs in (("halves", [(0, 2), (1, 3)]), ("adjacent", [(0, 1), (2, 3)])):
        s = hare.sparsify(w, bn=1, bm=5, bw=16, dtype=torch.float32, joint=joint)
        assert s.joint == joint and f"joint={joint}" in repr(s)
        for a, b in pairs:
            assert torch.equal(s.block_idx[:, a], s.block_idx[:, b])
        assert not torch.equal(s.block_idx, alone.block_idx)  # the constraint binds on this data
        assert torch.equal(s.to_dense(), w * s.mask())  # exact: stored values in place
        assert s.to(dtype=torch.bfloat16).joint == joint and s.select_experts(1, 3).joint == joint


def test_a_blocknm_built_without_joint_finds_the_pairing_its_indices_obey(gen):
    """Storage rebuilt from parts (a concatenation of chunks, another tool's files) keeps its pairing, so the kernels
    still read one token tile for paired panels; an explicit joint=None is taken as given."""
    w = torch.randn(2, 4 * PANEL, 160, generator=gen)
    parts = lambda s: (s.values, s.meta, s.block_idx)  # noqa: E731
    for joint in ("halves", "adjacent", None):
        s = hare.sparsify(w, bn=1, bm=5, bw=16, joint=joint)
        assert hare.BlockNM(*parts(s), shape=s.shape, bn=1, bm=5, bw=16).joint == joint
        assert hare.BlockNM(*parts(s), shape=s.shape, bn=1, bm=5, bw=16, joint=None).joint is None
    one = hare.sparsify(w[:, :PANEL], bn=1, bm=2, bw=16)  # a single panel pairs with nothing
    assert hare.BlockNM(*parts(one), shape=one.shape, bn=1, bm=2, bw=16).joint is None
    odd = hare.sparsify(w[:, :3 * PANEL], bn=1, bm=2, bw=16, joint="adjacent")  # out % 256 != 0: never "halves"
    assert hare.BlockNM(*parts(odd), shape=odd.shape, bn=1, bm=2, bw=16).joint == "adjacent"
    full = hare.sparsify(w, bn=1, bm=1, bw=16)  # 1:1: every panel keeps every block, halves comes first
    assert hare.BlockNM(*parts(full), shape=full.shape, bn=1, bm=1, bw=16).joint == "halves"
    with pytest.raises(InvalidArgumentError, match="joint: expected one of"):
        hare.BlockNM(*parts(full), shape=full.shape, bn=1, bm=1, bw=16, joint="auto-ish")


def test_adjacent_odd_last_panel_chooses_alone(gen):
    w = torch.randn(3 * PANEL, 64, generator=gen)
    s = hare.sparsify(w, bn=1, bm=2, bw=16, joint="adjacent")
    assert torch.equal(s.block_idx[0, 0], s.block_idx[0, 1])
    assert torch.equal(s.block_idx[0, 2], hare.sparsify(w[2 * PANEL:], bn=1, bm=2, bw=16).block_idx[0, 0])


def test_joint_errors_and_check(gen):
    w = torch.randn(384, 64, generator=gen)
    with pytest.raises(InvalidArgumentError, match="multiple of 256.*ffn a multiple of 128"):
        hare.sparsify(w, bn=1, bm=2, joint="halves")
    with pytest.raises(InvalidArgumentError, match="joint: expected one of"):
        hare.sparsify(w, bn=1, bm=2, joint="pairs")
    s = hare.sparsify(torch.randn(512, 64, generator=gen), bn=1, bm=2, joint="halves")
    broken = s.block_idx.clone()
    broken[0, 0, 0] = 1 - broken[0, 0, 0]  # still one of 2 blocks per window: valid alone, not jointly
    bad = hare.BlockNM(s.values, s.meta, broken, shape=s.shape, bn=1, bm=2, bw=16, joint="halves")
    with pytest.raises(InvalidArgumentError, match="paired panels keep different blocks"):
        bad.check()
    hare.BlockNM(s.values, s.meta, broken, shape=s.shape, bn=1, bm=2, bw=16).check()  # fine without the pairing


def test_save_load_round_trip_and_old_files(tmp_path, gen):
    gu = hare.sparsify(torch.randn(2, 256, 64, generator=gen), bn=1, bm=2, joint="halves")
    down = hare.sparsify(torch.randn(2, 384, 64, generator=gen), bn=1, bm=2, joint="adjacent")
    plain = hare.sparsify(torch.randn(2, 128, 64, generator=gen), bn=1, bm=2)
    save(tmp_path / "w.safetensors", {"gate_up": gu, "down": down, "plain": plain})
    back = load(tmp_path / "w.safetensors")
    assert {k: v.joint for k, v in back.items()} == {"gate_up": "halves", "down": "adjacent", "plain": None}
    assert all(torch.equal(back[k].to_dense(), v.to_dense()) for k, v in (("gate_up", gu), ("down", down)))

    old = tmp_path / "old.safetensors"
    save(old, plain)
    edit_hare_file(old, version="2", entry="weight", drop=("joint", "halves"))
    assert load(old).joint is None and load(old).halves is False  # version 2 predates both: unambiguous

    edit_hare_file(tmp_path / "w.safetensors", entry="gate_up", joint="diagonal")
    with pytest.raises(CheckpointError, match="'gate_up' is invalid: joint: expected one of"):
        load(tmp_path / "w.safetensors")
    bad = tmp_path / "bad.safetensors"  # a joint file whose pairs disagree is refused on load
    broken = gu.block_idx.clone()
    broken[0, 0, 0] = 1 - broken[0, 0, 0]
    save(bad, hare.BlockNM(gu.values, gu.meta, broken, shape=gu.shape, bn=1, bm=2, bw=16, joint="halves"))
    with pytest.raises(CheckpointError, match="paired panels keep different blocks"):
        load(bad)


def test_reconstruct_passes_the_pairing(gen):
    w = torch.randn(2, 256, 128, generator=gen)
    x = torch.randn(2, 512, 128, generator=gen) * torch.rand(128, generator=gen) * 3
    gram = x.transpose(1, 2) @ x
    s, _ = reconstruct(w, gram, bn=1, bm=2, joint="halves", dtype=torch.float32, refine=2)
    assert s.joint == "halves"
    s.check()
    assert torch.equal(s.block_idx[:, 0], s.block_idx[:, 1])
    with pytest.raises(InvalidArgumentError, match="joint='halves'"):
        reconstruct(w[:, :128], gram, bn=1, bm=2, joint="halves")


@pytest.fixture(scope="module")
def joint_model(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint whose ffn (128) admits joint gate/up panels, and a calibration text."""
    from hare.models.configs import WORDS, tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("joint_model")
    model = tiny_model("qwen3_moe", moe_intermediate_size=128)
    model.save_pretrained(root / "dense")
    tiny_tokenizer(model.config.vocab_size).save_pretrained(root / "dense")
    (root / "calib.txt").write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(200)))
    return root


@pytest.mark.parametrize("ffn", [128, 192, 32])  # any ffn % 16 == 0: gate/up in the halves layout
def test_patch_joint_panels(ffn):
    from hare.models.configs import tiny_model
    from hare.models.patch import experts_modules

    model = tiny_model("qwen3_moe", moe_intermediate_size=ffn)
    calib = hare.calibrate(model, torch.arange(64) % model.config.vocab_size)
    hare.patch(model, bn=1, bm=2, score=calib, joint_panels=True)
    for module in experts_modules(model).values():
        gu, down = module.weight("gate_up"), module.weight("down")
        assert (gu.joint, down.joint) == ("halves", "adjacent") and "joint panels" in module.extra_repr()
        assert (gu.halves, down.halves) == (True, False)
        panels = gu.block_idx.shape[1]
        assert panels == 2 * math.ceil(ffn / PANEL)
        assert torch.equal(gu.block_idx[:, :panels // 2], gu.block_idx[:, panels // 2:])
        gu.check()
    with pytest.raises(InvalidArgumentError, match="joint_panels: .*halves layout, which needs ffn a multiple of 16; "
                                                   "got ffn = 40"):
        hare.patch(tiny_model("qwen3_moe", moe_intermediate_size=40), bn=1, bm=2, joint_panels=True)
    with pytest.raises(InvalidArgumentError, match="joint_panels: only matters when pruning"):
        hare.patch(tiny_model("qwen3_moe"), joint_panels=True)


def test_patch_prunes_with_joint_panels_by_default():
    """(Wherever the ffn admits them: ffn % 16 == 0, which pruning down at bw >= 16 needs anyway.)"""
    from hare.models.configs import tiny_model
    from hare.models.patch import experts_modules

    joints = lambda model: {(m.weight("gate_up").joint, m.weight("down").joint)  # noqa: E731
                            for m in experts_modules(model).values()}
    assert joints(hare.patch(tiny_model("qwen3_moe", moe_intermediate_size=48), bn=1, bm=2)) == {("halves", "adjacent")}
    assert joints(hare.patch(tiny_model("qwen3_moe"), bn=1, bm=2, joint_panels=False)) == {(None, None)}
    with pytest.raises(InvalidArgumentError, match="joint_panels: expected None or a bool"):
        hare.patch(tiny_model("qwen3_moe"), bn=1, bm=2, joint_panels="yes")


def test_cli_sparsify_joint_panels_round_trip(joint_model, tmp_path):
    from typer.testing import CliRunner

    from hare.cli import app
    from hare.models.hare_folder import MANIFEST, load_model
    from hare.models.patch import experts_modules

    out = tmp_path / "hare"
    run = CliRunner().invoke(app, ["sparsify", str(joint_model / "dense"), str(out), "--density", "0.25",
                                   "--calib", str(joint_model / "calib.txt"), "--joint-panels"])
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["joint_panels"] is True and manifest["version"] == 3
    for module in experts_modules(load_model(out)).values():
        assert (module.weight("gate_up").joint, module.weight("down").joint) == ("halves", "adjacent")
    (out / MANIFEST).write_text(json.dumps({**manifest, "joint_panels": False}))
    with pytest.raises(CheckpointError, match="gate_up has joint='halves'.*says joint=None"):
        load_model(out)
    (out / MANIFEST).write_text(json.dumps({**manifest, "joint_panels": "yes"}))
    with pytest.raises(CheckpointError, match="field 'joint_panels' is 'yes'; expected a bool"):
        load_model(out)


def test_version_2_manifest_reads_as_not_joint(tiny_checkpoints, tmp_path):
    from hare.models.hare_folder import MANIFEST, read_manifest

    manifest = json.loads((tiny_checkpoints / "hare" / MANIFEST).read_text())
    assert manifest["joint_panels"] is True  # the default, where the ffn admits them
    del manifest["joint_panels"]
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "version": 2}))
    assert read_manifest(tmp_path)["joint_panels"] is False


@pytest.mark.parametrize("ffn", [192, 48, 160])
def test_joint_halves_pairs_gate_and_up_for_any_ffn_in_the_halves_layout(ffn, gen):
    w = torch.randn(2, 2 * ffn, 96, generator=gen) * torch.rand(2, 2 * ffn, 1, generator=gen)
    s = hare.sparsify(w, bn=1, bm=3, bw=16, dtype=torch.float32, joint="halves", halves=True)
    half = s.block_idx.shape[1] // 2
    assert half == math.ceil(ffn / PANEL) and torch.equal(s.block_idx[:, :half], s.block_idx[:, half:])
    assert torch.equal(s.to_dense(), w * s.mask())
    check_structure(s.mask(), 1, 3, 16, halves=True)
    s.check()
    broken = s.block_idx.clone()
    window = 3 * torch.arange(2, dtype=torch.int32)
    broken[0, half - 1] = (broken[0, half - 1] - window + 1) % 3 + window  # the next block of each window: valid alone
    hare.BlockNM(s.values, s.meta, broken, shape=s.shape, bn=1, bm=3, bw=16, halves=True).check()
    with pytest.raises(InvalidArgumentError, match="paired panels keep different blocks"):
        hare.BlockNM(s.values, s.meta, broken, shape=s.shape, bn=1, bm=3, bw=16, joint="halves", halves=True).check()
    with pytest.raises(InvalidArgumentError, match="multiple of 256.*or the layout halves=True"):
        hare.sparsify(w, bn=1, bm=3, joint="halves")  # the plain layout: out must be a multiple of 256
