"""The accuracy pipeline at toy size: corpus -> tokenizer + MoE training -> pruning by every method -> table."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hare.bench.corpus import build, rst_to_text, split_of
from hare.cli import app

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"method", "density", "bw", "joint_panels", "ppl", "layer_rel_err"}


def test_rst_to_text_keeps_prose_and_drops_markup():
    rst = (".. _label:\n\nTitle\n=====\n\n.. index:: single: x\n   pair: y\n\nThe :func:`print` function and "
           "``code`` with `a link <http://x>`_ and *emphasis*.\n\n.. note::\n\n   Kept note text.\n")
    text = rst_to_text(rst)
    assert text.splitlines()[0] == "Title"
    assert "The print function and code with a link and emphasis." in text
    assert "Kept note text." in text
    assert "index" not in text and "label" not in text and "=====" not in text


def test_corpus_split_is_by_document_and_stable(tmp_path):
    src = tmp_path / "src"
    for i in range(60):
        (src / f"d{i // 10}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i // 10}" / f"doc{i}.rst.txt").write_text(f"Document number {i}.\n")
    info = build(src, tmp_path / "out", "test")
    assert sum(info["documents"].values()) == 60 and min(info["documents"].values()) > 0
    for i in range(60):
        split = split_of(f"d{i // 10}/doc{i}.rst.txt")
        assert f"Document number {i}." in (tmp_path / "out" / f"{split}.txt").read_text()


def _toy_corpus(folder: Path) -> Path:
    """The repository's own prose, split by paragraph (CI has no Debian corpus)."""
    paragraphs = [p for f in [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "notes").glob("*.md"))]
                  for p in f.read_text().split("\n\n") if p.strip()]
    folder.mkdir()
    for split, keep in (("valid", lambda i: i % 10 == 0), ("calib", lambda i: i % 10 == 1),
                        ("train", lambda i: i % 10 > 1)):
        (folder / f"{split}.txt").write_text("\n\n".join(p for i, p in enumerate(paragraphs) if keep(i)))
    return folder


def test_train_sparsify_eval_pipeline(tmp_path):
    corpus, model = _toy_corpus(tmp_path / "corpus"), tmp_path / "model"
    run = CliRunner().invoke(app, ["bench", "train-moe", str(corpus), str(model), "--size", "toy", "--steps", "200",
                                   "--max-seconds", "3600", "--device", "cpu"])  # all 200 steps, however loaded
    assert run.exit_code == 0, run.output
    info = json.loads((model / "train_info.json").read_text())
    assert info["valid_ppl"] < 0.7 * info["unigram_ppl"]  # it learned more than token frequencies
    assert info["steps"] == 200 and info["train_tokens"] == 200 * 8 * 64
    for load in info["routing_load"].values():
        assert len(load) == 8 and abs(sum(load) - 1) < 1e-3

    out = tmp_path / "results" / "accuracy_toy.json"
    run = CliRunner().invoke(app, ["bench", "accuracy", str(model), "--corpus", str(corpus), "--out-json", str(out),
                                   "--densities", "0.5,0.25", "--bws", "16", "--calib-tokens", "2048",
                                   "--valid-tokens", "2048", "--time-layer", "toy", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert result["unigram_ppl"] == info["unigram_ppl"] and result["params"] == info["params"]
    assert result["dense_ppl"] < result["unigram_ppl"]
    records = result["records"]
    assert len(records) == 2 * 3 + 2 * 2 + 1
    assert "no joint-panel records: they need ffn a multiple of 128, this model's is 64" in run.output
    for r in records:
        assert set(r) == SCHEMA | ({"score"} if r["method"] == "unstructured" else set())
        assert r["ppl"] > 0 and 0 < r["layer_rel_err"] < 1.5
    by = {(r["method"], r.get("score"), r["density"]): r for r in records}
    for d in (0.5, 0.25):  # reconstruct minimises exactly this error
        assert by[("reconstruct", None, d)]["layer_rel_err"] < by[("activation", None, d)]["layer_rel_err"]
    # Block 1:1 with 2:4 inside is plain 2:4: the reference takes another code path to the same mask (the same error
    # up to float32 rounding of the two paths' sums: ~1e-6 relative, seen when the repository's prose, the corpus, changed)
    assert by[("2:4", None, 0.5)]["layer_rel_err"] == pytest.approx(by[("activation", None, 0.5)]["layer_rel_err"],
                                                                     rel=1e-5)
    assert result["reconstruct_timing"]["layer_seconds"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| reconstruct bw16 |" in out.with_suffix(".md").read_text()


def test_configurations_add_joint_panel_records_at_bw16():
    from hare.bench.accuracy import configurations, markdown_table

    configs = configurations((0.5, 0.1), (16, 32))
    joint = [c for c in configs if c["joint_panels"]]
    assert joint == [{"method": m, "density": d, "bw": 16, "joint_panels": True}
                     for d in (0.5, 0.1) for m in ("activation", "reconstruct")]
    assert len(configs) == len(configurations((0.5, 0.1), (16, 32), joint_panels=False)) + 4
    assert not any(c["joint_panels"] for c in configurations((0.5,), (32,)))  # joint records are bw 16 only
    records = [{**c, "ppl": 2.0, "layer_rel_err": 0.1, **({"score": "x"} if "unstructured" in c["method"] else {})}
               for c in configs]
    for r in records:
        r["method"] = "unstructured" if r["method"].startswith("unstructured") else r["method"]
    table = markdown_table({"records": records})
    assert "| activation bw16 joint |" in table and "| activation bw16 |" in table
