"""hare.patch on transformers MoE models, pruned checkpoints, generation, perplexity and their CLI (tiny random
models built locally; nothing is downloaded)."""

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hare.cli import app
from hare.errors import CheckpointError, InvalidArgumentError
from hare.models import ARCHITECTURES, HareExperts, UnsupportedModelError, calibrate, experts_modules, patch
from hare.models.hare_folder import MANIFEST, density_ratio, load_model, sparsify_checkpoint
from hare.models.configs import TINY, WORDS, save_tiny_model, tiny_model, tiny_tokenizer
from hare.models.generation import perplexity

from helpers import rel_error

MODEL_TYPES = [t for a in ARCHITECTURES for t in a.model_types]
TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(300))


def test_every_supported_architecture_has_a_tiny_config():
    assert set(MODEL_TYPES) == set(TINY)
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"} <= set(MODEL_TYPES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patch_dense_equals_transformers_and_pruned_generates(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        experts = list(experts_modules(model))
        assert patch(model) is model
        assert all(isinstance(model.get_submodule(n), HareExperts) for n in experts)
        assert rel_error(model(ids).logits, ref) < 1e-4
        patch(model, bn=1, bm=2)
        assert all(model.get_submodule(n).sparse for n in experts)
        pruned = model(ids).logits
    assert torch.isfinite(pruned).all()
    assert rel_error(pruned, ref) > 1e-3  # the experts matter: pruning them moves the logits
    out = model.generate(ids[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    assert out.shape == (1, 9) and (out[0, :5] == ids[0, :5]).all()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpoint_round_trip_gives_the_patched_logits(model_type, tmp_path):
    """sparsify (activation-aware, shard by shard) -> load_model has exactly the logits of patch on the same stats."""
    model = save_tiny_model(model_type, tmp_path / "src")
    reports = sparsify_checkpoint(tmp_path / "src", tmp_path / "out", 0.25, calib_text=TEXT, progress=False)
    assert [r.name for r in reports] == list(experts_modules(model))
    # values are 25% of the dense bytes; at these tiny K (32, 64) the 2:4 metadata is padded to whole 64-column
    # K tiles and to 16-row groups (the sparse-wgmma layout), which adds up to a few % more
    assert all(0 < r.rel_error < 5 and 0.25 < r.sparse_bytes / r.dense_bytes < 0.35 for r in reports)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert (manifest["bn"], manifest["bm"], manifest["calibration"]["criterion"]) == (1, 2, "activation-aware")

    loaded = load_model(tmp_path / "out")
    ids = tiny_tokenizer()(TEXT, return_tensors="pt").input_ids[0]
    patch(model, bn=1, bm=2, score=calibrate(model, ids[:512]))
    probe = torch.randint(4, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(probe).logits, model(probe).logits)


def test_calibration_changes_the_mask():
    model = tiny_model("mixtral")
    ids = tiny_tokenizer()(TEXT, return_tensors="pt").input_ids[0]
    calib = calibrate(model, ids, seq_len=100)
    assert calib.tokens == ids.numel()
    name = next(iter(calib.norms))
    n_in, n_hidden = calib.norms[name]
    assert n_in.shape == (4, 32) and n_hidden.shape == (4, 64) and (n_in > 0).any()
    magnitude = patch(tiny_model("mixtral"), bn=1, bm=2).get_submodule(name).weight("gate_up").mask()
    aware = patch(model, bn=1, bm=2, score=calib).get_submodule(name).weight("gate_up").mask()
    assert not torch.equal(magnitude, aware)


def test_patch_errors():
    with pytest.raises(InvalidArgumentError, match="both bn and bm"):
        patch(tiny_model("olmoe"), bn=1)
    with pytest.raises(InvalidArgumentError, match="Calibration"):
        patch(tiny_model("olmoe"), bn=1, bm=2, score=torch.ones(3))
    pruned = patch(tiny_model("olmoe"), bn=1, bm=2)
    with pytest.raises(InvalidArgumentError, match="already pruned"):
        patch(pruned, bn=1, bm=5)


def test_unsupported_models_say_what_is_supported():
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(UnsupportedModelError, match="Mixtral.*GPT-OSS.*standard layout"):
        patch(llama)

    class Mxfp4GptOssExperts(torch.nn.Module):  # stands for transformers' quantized experts module
        pass

    llama.model.layers[0].mlp.experts = Mxfp4GptOssExperts()
    with pytest.raises(UnsupportedModelError, match="Mxfp4GptOssExperts; quantized experts.*dequantized"):
        patch(llama)



def test_density_mapping():
    assert [density_ratio(d) for d in (0.5, 0.25, 0.1, 0.05)] == [(1, 1), (1, 2), (1, 5), (1, 10)]
    with pytest.raises(InvalidArgumentError, match="0.25"):
        density_ratio(0.3)


def test_perplexity_is_the_exponentiated_mean_token_loss():
    model = tiny_model("qwen3_moe")
    ids = tiny_tokenizer()(TEXT, return_tensors="pt").input_ids[0]
    ppl, count = perplexity(model, ids, window=64)
    windows = [w for w in ids.split(64) if w.numel() > 1]
    assert count == sum(w.numel() - 1 for w in windows)
    losses = []
    with torch.no_grad():
        for w in windows:
            logp = model(w[None]).logits[0, :-1].double().log_softmax(-1)
            losses += [-logp[i, w[i + 1]] for i in range(w.numel() - 1)]
    assert ppl == pytest.approx(float(torch.stack(losses).mean().exp()), rel=1e-5)
    with pytest.raises(InvalidArgumentError):
        perplexity(model, ids[:1])


# ---- command line ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_model("qwen2_moe", root / "dense")
    (root / "calib.txt").write_text(TEXT)
    result = CliRunner().invoke(app, ["sparsify", str(root / "dense"), str(root / "hare"), "--density", "0.25",
                                      "--calib", str(root / "calib.txt")])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_cli_sparsify_reports_every_layer(checkpoints):
    root, output = checkpoints
    assert "model.layers.0.mlp.experts" in output and "model.layers.1.mlp.experts" in output
    assert (root / "hare" / MANIFEST).is_file() and (root / "hare" / "tokenizer.json").is_file()


def test_cli_eval_prints_the_perplexity_of_each_checkpoint(checkpoints):
    root, _ = checkpoints
    ppl = {}
    for name in ("dense", "hare"):
        result = CliRunner().invoke(app, ["eval", str(root / name), "--text", str(root / "calib.txt"), "--window", "128"])
        assert result.exit_code == 0, result.output
        ppl[name] = float(re.search(r"perplexity ([0-9.]+) over", result.output).group(1))
    ids = tiny_tokenizer()(TEXT, return_tensors="pt").input_ids[0]
    assert ppl["hare"] == pytest.approx(perplexity(load_model(root / "hare"), ids, 128)[0], rel=1e-4)
    assert ppl["dense"] != ppl["hare"]


def test_cli_generate_dense_and_hare(checkpoints):
    root, _ = checkpoints
    for name in ("dense", "hare"):
        result = CliRunner().invoke(app, ["generate", str(root / name), "--prompt", "the water", "--max-new-tokens", "5"])
        assert result.exit_code == 0, result.output
        text = result.stdout.strip().splitlines()[-1]
        assert text.startswith("the water") and len(text.split()) >= 3


def test_cli_errors_on_missing_foreign_and_dense_folders(checkpoints, tmp_path):
    root, _ = checkpoints
    runner = CliRunner()
    missing = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "the"])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    foreign = runner.invoke(app, ["eval", str(tmp_path / "foreign"), "--text", str(root / "calib.txt")])
    assert foreign.exit_code == 2 and "no config.json" in foreign.output
    exists = runner.invoke(app, ["sparsify", str(root / "dense"), str(root / "hare")])
    assert exists.exit_code == 2 and "not empty" in exists.output
    density = runner.invoke(app, ["sparsify", str(root / "dense"), str(tmp_path / "x"), "--density", "0.3"])
    assert density.exit_code == 2 and "density" in density.output
    shutil.copytree(root / "hare", tmp_path / "other")
    (tmp_path / "other" / MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="hare-model"):
        load_model(tmp_path / "other")


def test_bench_model_records_on_a_tiny_model():
    from hare.bench.model import bench_one, summary
    from hare.models.configs import tiny_config

    records = bench_one("tiny", tiny_config("qwen3_moe"), torch.device("cpu"), torch.float32, 2, prefill_tokens=32,
                        batches=(1, 4), context=8, densities=(0.25,), say=lambda s: None)
    assert {r["case"] for r in records} == {"tiny/prefill", "tiny/decode-b1", "tiny/decode-b4"}
    assert {r["variant"] for r in records} == {"hare-dense", "hare-0.25"}
    for r in records:
        assert r["bench"] == "model" and r["ours_ms"] > 0 and r["baseline_ms"] > 0 and 0 <= r["moe_share"] < 1
        assert r["speedup_vs_transformers"] == pytest.approx(r["baseline_ms"] / r["ours_ms"])
        assert r["attention"] == "hare"
    assert {r["mode"] for r in records} == {"eager"}  # no CUDA graphs on the CPU
    stock = bench_one("tiny", tiny_config("qwen3_moe"), torch.device("cpu"), torch.float32, 2, prefill_tokens=0,
                      batches=(2,), context=8, densities=(), attention="sdpa", say=lambda s: None)
    assert {(r["case"], r["variant"], r["attention"]) for r in stock} == {("tiny/decode-b2", "hare-dense", "sdpa")}
    means = summary(records + stock)
    assert means["hare/eager/mean_speedup_vs_transformers_at_0.25"] > 0
    assert means["sdpa/eager/mean_speedup_vs_grouped_mm_at_1"] == pytest.approx(stock[0]["speedup_vs_grouped_mm"])
    assert "sdpa/eager/mean_speedup_vs_grouped_mm_at_0.25" not in means  # no 25% record ran with sdpa


@pytest.mark.parametrize("kwargs,match", [(dict(attentions=("flash",)), "attention"),
                                          (dict(attentions=()), "attention"),
                                          (dict(densities=(0.3,)), "densities"),
                                          (dict(batches=(0,)), "batches"), (dict(models="gpt2"), "unknown")])
def test_bench_model_refuses_bad_options_before_looking_for_a_gpu(kwargs, match):
    from hare.bench.model import main

    with pytest.raises(InvalidArgumentError, match=match):
        main(**kwargs)


def test_cli_bench_model_says_what_is_wrong_with_a_list():
    result = CliRunner().invoke(app, ["bench", "model", "--batches", "1,eight"])
    assert result.exit_code != 0 and "batches" in result.output


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_bench_static_decode_step_is_the_next_token_and_repeatable(arch):
    """The benchmark's decode step (static cache, rewound after each call) computes the same logits as a full
    forward over history + step, every time it runs."""
    from hare.bench.model import static_decode_step
    from hare.models.configs import tiny_config

    torch.manual_seed(0)
    config = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    tokens = torch.randint(0, config.vocab_size, (3, 10))
    step = static_decode_step(model, tokens[:, :9], tokens[:, 9:], chunk_tokens=12)  # 4 tokens per piece
    with torch.no_grad():
        full = model(input_ids=tokens).logits[:, -1]
    for _ in range(3):
        torch.testing.assert_close(step()[:, -1], full, rtol=1e-4, atol=1e-4)


def test_bench_model_combine_joins_runs_of_one_commit_and_refuses_mixed_ones(tmp_path):
    from hare.bench.model import merge_results

    def run(model, commit="abc", date="2026-11-25T10:00:00+00:00", speedup=2.0, **attention):
        record = {"model": model, "density": 0.25, "mode": "eager", "context": 0,
                  "speedup_vs_transformers": speedup, "speedup_vs_grouped_mm": speedup / 2, **attention}
        return {"gpu": "H100", "commit": commit, "torch": "2.11", "date": date, "wall_s": 10.0,
                "summary": {}, "records": [record]}

    joined = merge_results([run("a"), run("b", date="2026-11-25T11:00:00+00:00", speedup=4.0)])
    assert [r["model"] for r in joined["records"]] == ["a", "b"]
    assert joined["wall_s"] == 20.0 and joined["date"] == "2026-11-25T11:00:00+00:00"
    assert [r["models"] for r in joined["runs"]] == [["a"], ["b"]]
    assert joined["summary"]["sdpa/eager/mean_speedup_vs_grouped_mm_at_0.25"] == pytest.approx(1.5)
    with pytest.raises(InvalidArgumentError, match="commit"):
        merge_results([run("a"), run("b", commit="def")])
    with pytest.raises(InvalidArgumentError, match="more than one run"):
        merge_results([run("a"), run("a")])
    both = merge_results([run("a"), run("a", speedup=6.0, attention="hare")])  # one model, two attentions
    assert both["summary"]["hare/eager/mean_speedup_vs_grouped_mm_at_0.25"] == pytest.approx(3.0)
    (tmp_path / "bad.json").write_text("{")
    result = CliRunner().invoke(app, ["bench", "model-combine", str(tmp_path / "bad.json"), "--out-json",
                                      str(tmp_path / "out.json")])
    assert result.exit_code == 2 and "cannot read" in result.output
