"""The halves panel layout (``halves=True``) through the package: hare.moe's reference path, the reconstruction
pruner, hare.patch and the CLI (gate/up in the layout, down not), expert sharding, HareExperts and checkpoints
(format version 4 records it; versions 2 and 3 read as the plain layout)."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import hare
from hare.blocknm import PANEL
from hare.checkpoint import VERSION, load, save
from hare.errors import CheckpointError
from hare.models.experts import HareExperts
from hare.reconstruct import reconstruct
from helpers import edit_hare_file, random_topk, rel_error
from test_blocknm import check_structure
from test_reconstruct import naive_obs, planted

FFN = 192  # % 128 == 64: in the plain layout gate/up panel 1 would hold 64 gate and 64 up rows


def gate_up(gen, experts=4, ffn=FFN, hidden=64):
    return torch.randn(experts, 2 * ffn, hidden, generator=gen) * torch.rand(experts, 2 * ffn, 1, generator=gen)


def test_moe_reference_on_a_halves_weight_is_the_dense_one(gen):
    w_gu = hare.sparsify(gate_up(gen), bn=1, bm=2, bw=16, dtype=torch.float32, halves=True)
    w_down = hare.sparsify(torch.randn(4, 64, FFN, generator=gen), bn=1, bm=2, bw=16, dtype=torch.float32)
    x, ids, weights = torch.randn(9, 64, generator=gen), random_topk(9, 4, 2, gen), torch.rand(9, 2, generator=gen)
    out = hare.moe(x, ids, weights, w_gu, w_down)
    assert rel_error(out, hare.moe(x, ids, weights, w_gu.to_dense(), w_down.to_dense())) < 1e-6


def test_reconstruct_in_the_halves_layout(gen):
    x, gram, w = planted(gen, out=2 * FFN, inp=128)
    sparse, fallback = reconstruct(w, gram, bn=1, bm=2, bw=16, refine=0, dtype=torch.float32, halves=True)
    assert fallback == [] and sparse.halves and sparse.block_idx.shape[1] == 4
    keep = sparse.mask()
    check_structure(keep, 1, 2, 16, halves=True)
    sparse.check()
    for e in range(w.shape[0]):  # the update is the column-by-column one with its (halves-layout) mask
        assert rel_error(sparse.to_dense()[e], naive_obs(w[e], keep[e], gram[e])) < 1e-4
    joint, _ = reconstruct(w, gram, bn=1, bm=2, bw=16, dtype=torch.float32, joint="halves", halves=True)
    assert joint.halves and torch.equal(joint.block_idx[:, :2], joint.block_idx[:, 2:])
    with pytest.raises(hare.InvalidArgumentError, match="halves=True"):
        reconstruct(w[:, :40], gram, bn=1, bm=2, halves=True)  # out/2 = 20


def test_shard_experts_and_hare_experts_keep_the_layout(gen, tmp_path):
    import torch.distributed as dist

    from hare.distributed import shard_experts

    w_gu = hare.sparsify(gate_up(gen), bn=1, bm=2, bw=16, halves=True, joint="halves")
    w_down = hare.sparsify(torch.randn(4, 64, FFN, generator=gen), bn=1, bm=2, bw=16)
    module = HareExperts(w_gu, w_down, "silu")
    back = module.weight("gate_up")
    assert (back.halves, back.joint, module.weight("down").halves) == (True, "halves", False)
    assert torch.equal(back.to_dense(), w_gu.to_dense())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        shard = shard_experts(w_gu)
    finally:
        dist.destroy_process_group()
    assert shard.halves and shard.joint == "halves" and torch.equal(shard.to_dense(), w_gu.to_dense())
    shard.check()


def test_patch_prunes_gate_up_in_the_halves_layout_and_down_not():
    from hare.models.configs import tiny_model
    from hare.models.patch import dense_experts, experts_modules

    for ffn, panels in ((FFN, 4), (128, 2), (32, 2)):  # ffn 32: one 32-row panel per half
        model = tiny_model("qwen3_moe", moe_intermediate_size=ffn)
        dense = {n: dense_experts(m).gate_up.detach().clone() for n, m in experts_modules(model).items()}
        hare.patch(model, bn=1, bm=2, joint_panels=False)  # the layout alone
        for name, module in experts_modules(model).items():
            gu, down = module.weight("gate_up"), module.weight("down")
            assert (gu.halves, down.halves) == (True, False) and gu.block_idx.shape[1] == panels
            gu.check()
            want = hare.sparsify(dense[name], bn=1, bm=2, dtype=gu.dtype, halves=True)  # magnitude
            assert torch.equal(gu.block_idx, want.block_idx) and torch.equal(gu.to_dense(), want.to_dense())


def test_cli_sparsify_writes_and_loads_the_halves_layout(tmp_path):
    from typer.testing import CliRunner

    from hare.cli import app
    from hare.models.configs import WORDS, tiny_model, tiny_tokenizer
    from hare.models.hare_folder import load_model
    from hare.models.patch import experts_modules

    model = tiny_model("qwen3_moe", moe_intermediate_size=FFN)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(200)))
    out = tmp_path / "hare"
    run = CliRunner().invoke(app, ["sparsify", str(tmp_path / "dense"), str(out), "--density", "0.25",
                                   "--calib", str(tmp_path / "calib.txt"), "--joint-panels"])
    assert run.exit_code == 0, run.output
    first = sorted(out.glob("hare-experts-*.safetensors"))[0]
    with safe_open(first, "pt") as f:
        meta = f.metadata()
    entries = json.loads(meta["entries"])
    assert meta["version"] == str(VERSION) == "4"
    assert (entries["gate_up"]["halves"], entries["down"]["halves"]) == (True, False)
    for module in experts_modules(load_model(out)).values():
        gu = module.weight("gate_up")
        assert gu.halves and gu.joint == "halves" and gu.block_idx.shape[1] == 2 * math.ceil(FFN / PANEL)
        assert torch.equal(gu.block_idx[:, :2], gu.block_idx[:, 2:])


def test_checkpoint_version_4_round_trip_and_older_versions(tmp_path, gen):
    gu = hare.sparsify(gate_up(gen, experts=2), bn=1, bm=2, halves=True, joint="halves")
    plain = hare.sparsify(torch.randn(2, 256, 64, generator=gen), bn=1, bm=2, joint="halves")
    path = tmp_path / "w.safetensors"
    save(path, {"gate_up": gu, "plain": plain})
    back = load(path)
    assert (back["gate_up"].halves, back["plain"].halves) == (True, False)
    assert back["gate_up"].joint == "halves" and "halves=True" in repr(back["gate_up"])
    for k, v in (("gate_up", gu), ("plain", plain)):
        assert all(torch.equal(getattr(back[k], p), getattr(v, p)) for p in ("values", "meta", "block_idx"))

    v3 = tmp_path / "v3.safetensors"  # a version-3 file: no halves field, valid in the plain layout
    save(v3, plain)
    edit_hare_file(v3, version="3", entry="weight", drop=("halves",))
    old = load(v3)
    assert old.halves is False and old.joint == "halves" and torch.equal(old.to_dense(), plain.to_dense())

    edit_hare_file(path, entry="gate_up", halves="yes")
    with pytest.raises(CheckpointError, match="'gate_up' is invalid: halves: expected a bool"):
        load(path)
    edit_hare_file(v3, version="5")
    with pytest.raises(CheckpointError, match="version '5'; this Hare reads versions 2, 3, 4"):
        load(v3)


def test_the_kernels_take_halves_gate_up_at_any_ffn_and_refuse_a_halves_down_whose_panels_differ():
    from hare.gpu import _contract

    x, g = torch.zeros(1, 320, dtype=torch.bfloat16), torch.Generator().manual_seed(0)
    wgu, wd = torch.randn(2, 384, 320, generator=g), torch.randn(2, 320, 192, generator=g)
    sgu = hare.sparsify(wgu, bn=1, bm=2, halves=True)  # ffn 192: gate and up panels of 128 + 64 rows
    assert _contract(x, sgu, wd.bfloat16(), "silu") is None
    assert "halves=True" in _contract(x, hare.sparsify(wgu, bn=1, bm=2), wd.bfloat16(), "silu")
    assert "halves=False" in _contract(x, sgu, hare.sparsify(wd, bn=1, bm=2, halves=True), "silu")  # 160 % 128
    assert _contract(x, sgu, hare.sparsify(wd, bn=1, bm=2), "silu") is None
