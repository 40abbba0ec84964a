import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hare
from hare.models.hare_folder import MANIFEST, load_model


@pytest.fixture
def weight(gen):
    return hare.sparsify(torch.randn(3, 130, 96, generator=gen), bn=1, bm=2, bw=16)


def same(a: hare.BlockNM, b: hare.BlockNM) -> bool:
    return (a.shape, a.bn, a.bm, a.bw) == (b.shape, b.bn, b.bm, b.bw) and all(
        torch.equal(getattr(a, p), getattr(b, p)) for p in ("values", "meta", "block_idx"))


def test_round_trip_single(tmp_path, weight):
    hare.save(tmp_path / "w.safetensors", weight)
    back = hare.load(tmp_path / "w.safetensors")
    assert isinstance(back, hare.BlockNM) and same(back, weight)
    assert torch.equal(back.to_dense(), weight.to_dense())


def test_round_trip_dict_with_plain_tensors(tmp_path, weight, gen):
    bias = torch.randn(5, generator=gen)
    two_d = hare.sparsify(torch.randn(40, 64, generator=gen), bn=1, bm=10, bw=32, dtype=torch.float32)
    hare.save(tmp_path / "m.safetensors", {"layers.0.w": weight, "bias": bias, "two_d": two_d})
    back = hare.load(tmp_path / "m.safetensors")
    assert set(back) == {"layers.0.w", "bias", "two_d"}
    assert same(back["layers.0.w"], weight) and same(back["two_d"], two_d)
    assert torch.equal(back["bias"], bias) and back["two_d"].shape == (40, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "temporary file left behind"


def test_failed_write_keeps_the_old_file(tmp_path, weight):
    path = tmp_path / "w.safetensors"
    hare.save(path, weight)
    before = path.read_bytes()
    with pytest.raises(hare.InvalidArgumentError):
        hare.save(path, {"ok": weight, "bad": "not a tensor"})
    assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def _rewrite(src, dst, change_tensors=None, change_meta=None):
    tensors = load_file(src)
    with open(src, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, dst, metadata=meta)


def _set(d, k, v):
    d[k] = v


@pytest.mark.parametrize("tensors,meta,match", [
    (None, lambda m: m.pop("format"), "not a Hare file"),
    (None, lambda m: _set(m, "version", "99"), "version"),
    (None, lambda m: _set(m, "version", "1"), r"older Hare with a different 2:4 metadata layout.*re-run `hare sparsify`"),
    (None, lambda m: _set(m, "entries", "{"), "malformed"),
    (lambda t: t.pop("weight.meta"), None, "missing"),
    (lambda t: _set(t, "extra", torch.zeros(1)), None, "not described"),
    (lambda t: _set(t, "weight.block_idx", t["weight.block_idx"] + 50), None, "block_idx"),
    (lambda t: _set(t, "weight.block_idx", t["weight.block_idx"].flip(-1).contiguous()), None, "ascending"),
    (lambda t: _set(t, "weight.block_idx", t["weight.block_idx"].long()), None, "dtype"),
    (lambda t: _set(t, "weight.values", t["weight.values"][:, :, :-2].contiguous()), None, "shape"),
    (lambda t: _set(t, "weight.meta", torch.zeros_like(t["weight.meta"])), None, "nibble"),
    (lambda t: _set(t, "weight.meta", t["weight.meta"][:, :, :-64].contiguous()), None, "shape"),  # one step short
    (lambda t: t["weight.meta"][..., -1].fill_(0x99), None, "padding"),  # rows 16G+15, groups 14-15 of 12: padding
    (None, lambda m: _set(m, "entries", m["entries"].replace('"bm": 2', '"bm": 0')), "bm"),
])
def test_corrupt_files_are_rejected(tmp_path, weight, tensors, meta, match):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    hare.save(good, weight)
    _rewrite(good, bad, tensors, meta)
    with pytest.raises(hare.CheckpointError, match=match):
        hare.load(bad)


def test_garbage_truncated_and_missing_files(tmp_path, weight):
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    (tmp_path / "text").write_text("hello, this is not a checkpoint at all")
    hare.save(tmp_path / "w", weight)
    data = (tmp_path / "w").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    for name in ("junk", "text", "cut", "nope"):
        with pytest.raises(hare.CheckpointError):
            hare.load(tmp_path / name)


def test_foreign_safetensors_file(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(hare.CheckpointError, match="not a Hare file"):
        hare.load(tmp_path / "foreign.safetensors")


def test_metadata_round_trip_and_bad_metadata(tmp_path, weight):
    hare.save(tmp_path / "w", weight, metadata={"layer": "a.b"})
    assert hare.checkpoint.load_metadata(tmp_path / "w") == {"layer": "a.b"} and same(hare.load(tmp_path / "w"), weight)
    hare.save(tmp_path / "plain", weight)
    assert hare.checkpoint.load_metadata(tmp_path / "plain") == {}
    with pytest.raises(hare.InvalidArgumentError, match="metadata"):
        hare.save(tmp_path / "x", weight, metadata={"bn": 1})
    assert not (tmp_path / "x").exists()


# ---- Hare model checkpoints (hare_model.json + one Hare file per MoE layer) ------------------------------------
LAYER0, LAYER1 = "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"


def _edit_manifest(folder, change):
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


def _swap_files(folder):
    a, b = folder / "hare-experts-00000.safetensors", folder / "hare-experts-00001.safetensors"
    a.rename(folder / "tmp"), b.rename(a), (folder / "tmp").rename(b)


def _rewrite_expert_file(folder, change_weights=None, change_meta=None):
    path = folder / "hare-experts-00000.safetensors"
    weights, meta = hare.load(path), hare.checkpoint.load_metadata(path)
    hare.save(path, change_weights(weights) if change_weights else weights,
              metadata=change_meta(meta) if change_meta else meta)


def _nan(weights):
    weights["gate_up"].values[0, 0, 0] = float("nan")
    return weights


def _prune_again(weights):  # a file of 1:5 weights (the dense expansion re-pruned) under its 1:2 metadata
    return {k: hare.sparsify(w.to_dense(), bn=1, bm=5) for k, w in weights.items()}


@pytest.mark.parametrize("mutate,match", [
    (lambda f: (f / MANIFEST).write_text("[1, 2]"), "expected a JSON object, got a JSON list"),
    (lambda f: _edit_manifest(f, lambda m: {k: v for k, v in m.items() if k != "experts"}), "no 'experts' field"),
    (lambda f: _edit_manifest(f, lambda m: {**m, "version": 1}), r"version 1, written by an older Hare.*re-run"),
    (lambda f: _edit_manifest(f, lambda m: {**m, "version": 7}), "version 7; this Hare reads versions 2 and 3"),
    (lambda f: _edit_manifest(f, lambda m: {**m, "bm": 5}), r"density 0.25 is Block 1:2, but fields bn, bm say 1:5"),
    (lambda f: _edit_manifest(f, lambda m: {**m, "density": 0.1, "bm": 5}),
     r"hare-experts-00000.safetensors: density is '0.25' in the file, '0.1' in hare_model.json"),
    (lambda f: _edit_manifest(f, lambda m: {**m, "experts": {**m["experts"], LAYER0: "../x.safetensors"}}),
     "field 'experts' must map each experts module"),
    (lambda f: _swap_files(f), f"layer is '{LAYER1}' in the file, '{LAYER0}' in hare_model.json"),
    (lambda f: (f / "hare-experts-00001.safetensors").unlink(), "no such file .hare_model.json lists it"),
    (lambda f: _rewrite_expert_file(f, change_meta=lambda m: {k: v for k, v in m.items() if k != "layer"}),
     "layer is None in the file"),
    (lambda f: _rewrite_expert_file(f, _nan), r"gate_up holds non-finite values \(NaN or inf\)"),
    (lambda f: _rewrite_expert_file(f, _prune_again), "gate_up is 1:5 bw 16, hare_model.json says 1:2 bw 16"),
    (lambda f: (f / MANIFEST).unlink(), "Hare expert files .* but no hare_model.json: an incomplete"),
    (lambda f: [(f / MANIFEST).unlink(), *map(lambda p: p.unlink(), f.glob("hare-experts-*"))],
     r"weights missing from its shards \(transformers would fill them at random\)"),
])
def test_hare_folder_that_disagrees_with_itself_is_refused(tiny_checkpoints, tmp_path, mutate, match):
    folder = tmp_path / "hare"
    shutil.copytree(tiny_checkpoints / "hare", folder)
    mutate(folder)
    with pytest.raises(hare.CheckpointError, match=match):
        load_model(folder)


def test_hare_folder_loads_with_the_files_it_wrote(tiny_checkpoints):
    model = load_model(tiny_checkpoints / "hare")
    experts = model.get_submodule(LAYER0)
    assert experts.sparsity == {"bn": 1, "bm": 2, "bw": 16}
    meta = hare.checkpoint.load_metadata(tiny_checkpoints / "hare" / "hare-experts-00000.safetensors")
    assert meta == {"layer": LAYER0, "density": "0.25", "bn": "1", "bm": "2", "bw": "16"}
