"""The kernel benchmark's CPU-side parts: suite case lists, option handling, the FLOP/byte accounting of sparse
records, chunked sparsify/densify, the report text and the plots (the timing itself runs on the GPU)."""

import json
from pathlib import Path

import pytest
import torch

import hare
from hare.bench import kernels, sparse, toolkit
from hare.bench.shapes import MODEL_SHAPES

H, F = 256, 384  # toy expert: gate/up in = 256 (16 blocks of 16), down in = 384 (24 blocks)
CEIL = {"matmul_tflops": 100.0, "copy_tbps": 2.0, "read_tbps": 2.0}


def toy_weights(gen, E=4, density=0.25):
    bn, bm = hare.blocknm.DENSITIES[density]
    wgu, wd = torch.randn(E, 2 * F, H, generator=gen), torch.randn(E, H, F, generator=gen)
    return toolkit.sparsify_experts(wgu, bn, bm, 16), toolkit.sparsify_experts(wd, bn, bm, 16)


def toy_case(suite="models", shape="toy", T=8, E=4, k=2, density=0.25):
    return sparse.Case(suite, shape, H, F, E, k, "uniform", T, (density,), 16)


# ------------------------------------------------------------------------------------------ suites and options
def test_paper_real_suite_is_five_models_at_three_densities_on_4096_tokens_top1_of_4():
    cases = sparse.select_cases(["real"])
    assert [c.shape for c in cases] == ["mixtral-8x22b", "mixtral-8x7b", "minicpm-moe-8x2b", "deepseek-moe-16b",
                                        "qwen3-30b-a3b"]
    assert {(c.tokens, c.top_k, c.experts, c.routing, c.densities, c.bw) for c in cases} == \
        {(4096, 1, 4, "uniform", (0.5, 0.25, 0.1), 16)}
    assert sum(len(c.densities) for c in cases) == 15
    for c in cases:  # each expert is the model's own FFN
        if c.shape in MODEL_SHAPES:
            assert (c.hidden, c.ffn) == MODEL_SHAPES[c.shape][:2]
        assert c.ffn % 128 == 0  # Block N:M gate/up weights on the GPU need whole 128-row panels


def test_synthetic_suite_is_the_paper_grid_with_weights_that_fit():
    cases = sparse.select_cases(["synthetic"])
    assert len(cases) == 6 * 4 * 4 == len({(c.hidden, c.experts, c.tokens) for c in cases})
    assert {c.hidden for c in cases} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.tokens for c in cases} == {512, 2048, 8192, 16384}
    assert {c.experts for c in cases} == {2, 4, 6, 8}
    assert {(c.densities, c.bw, c.top_k, c.routing) for c in cases} == {((0.25,), 16, 1, "uniform")}
    assert all(c.ffn == min(4 * c.hidden, sparse.SYNTH_FFN_CAP) and c.ffn % 128 == 0 for c in cases)
    assert [c.ffn for c in cases if c.hidden <= 4096] == [4 * c.hidden for c in cases if c.hidden <= 4096]
    # the largest dense stack (8 experts) plus its densified reference copy fit an 80 GB H100 with room to spare
    assert max(2 * 8 * 3 * c.hidden * c.ffn * 2 for c in cases) < 80e9 / 2
    assert 2 * 8 * 3 * 16384 * (4 * 16384) * 2 > 80e9  # uncapped they would not


def test_model_suite_defaults_to_uniform_token_sweep_and_zipf_at_4096():
    cases = sparse.select_cases(["models"], [0.5, 0.05], 32)
    assert {c.shape for c in cases} == set(MODEL_SHAPES)
    for s in MODEL_SHAPES:
        pairs = [(c.routing, c.tokens) for c in cases if c.shape == s]
        assert pairs == [("uniform", T) for T in (1, 16, 64, 1024, 4096, 16384)] + [("zipf", 4096)]
    assert all(c.densities == (0.5, 0.05) and c.bw == 32 for c in cases)
    explicit = sparse.select_cases(["models"], [0.25], shapes=["qwen3-30b-a3b"], tokens=[1, 4096], routings=["zipf"])
    assert [(c.shape, c.routing, c.tokens) for c in explicit] == [("qwen3-30b-a3b", "zipf", 1),
                                                                 ("qwen3-30b-a3b", "zipf", 4096)]
    assert (explicit[0].experts, explicit[0].top_k) == MODEL_SHAPES["qwen3-30b-a3b"][2:]


def test_cusparselt_runs_only_where_its_setup_is_affordable():
    real = sparse.paper_real_cases()[0]
    assert sparse.cusparselt_skip_reason(real) is None
    assert "synthetic" in sparse.cusparselt_skip_reason(sparse.paper_synthetic_cases()[-1])
    models = {(c.shape, c.tokens): c for c in sparse.model_cases([0.5])}
    assert sparse.cusparselt_skip_reason(models[("mixtral-8x7b", 16384)]) is None
    assert "tokens" in sparse.cusparselt_skip_reason(models[("mixtral-8x7b", 64)])
    assert "experts" in sparse.cusparselt_skip_reason(models[("qwen3-30b-a3b", 16384)])


@pytest.mark.parametrize("argv", [["--suite", "models", "real"], ["--suite", "real", "--density", "0.5"],
                                  ["--suite", "synthetic", "--tokens", "64"], ["--density", "0.3"], ["--bw", "48"],
                                  ["--density", "0.5", "--no-baselines"]])
def test_bad_sparse_options_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        kernels.main(argv)
    assert exc.value.code == 2


def test_main_runs_dense_without_density_and_sparse_with_it(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "run_kernel_bench", lambda **kw: calls.append(("dense", kw)))

    def fake_sparse(cases, errors=(), **kw):
        calls.append(("sparse", cases, kw))
        return {"errors": list(errors)}

    monkeypatch.setattr(sparse, "run_sparse_bench", fake_sparse)
    kernels.main(["--tokens", "1", "16", "--out-json", "d.json"])
    kernels.main(["--density", "0.5", "0.1", "--shapes", "qwen3-30b-a3b", "--out-json", "s.json"])
    kernels.main(["--suite", "real", "synthetic"])
    (kind, kw), (kind2, cases2, kw2), (kind3, cases3, _) = calls
    assert kind == "dense" and kw["tokens"] == [1, 16] and kw["out_json"] == "d.json" and kw["baselines"]
    assert kind2 == "sparse" and kw2["out_json"] == "s.json" and len(cases2) == 7
    assert all(c.densities == (0.5, 0.1) and c.shape == "qwen3-30b-a3b" for c in cases2)
    assert kind3 == "sparse" and [c.suite for c in cases3] == ["real"] * 5 + ["synthetic"] * 96
    monkeypatch.setattr(sparse, "run_sparse_bench", lambda cases, **kw: fake_sparse(cases, errors=[{"x": 1}]))
    with pytest.raises(SystemExit) as exc:  # a failed sparse kernel call fails the run
        kernels.main(["--suite", "real"])
    assert "1 sparse kernel call" in str(exc.value.code)


# ------------------------------------------------------------------------------------------ weights and accounting
def test_chunked_sparsify_and_densify_equal_the_whole_stack(monkeypatch, gen):
    w = torch.randn(5, 256, 128, generator=gen)
    monkeypatch.setattr(toolkit, "CHUNK_ELEMS", 2 * 256 * 128)  # chunks of 2, 2 and 1 experts
    whole, chunked = hare.sparsify(w, bn=1, bm=5, bw=16), toolkit.sparsify_experts(w, 1, 5, 16)
    for field in ("values", "meta", "block_idx"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field))
    assert chunked.shape == whole.shape and (chunked.bn, chunked.bm, chunked.bw) == (1, 5, 16)
    assert torch.equal(toolkit.densify(chunked), whole.to_dense())


def test_sparse_record_counts_dense_equivalent_flops_and_compressed_bytes_of_touched_experts(gen):
    gu, dn = toy_weights(gen, density=0.25)
    c = toy_case(T=8, k=2)
    counts = torch.tensor([5, 0, 11, 0])  # experts 0 and 2 touched
    times = {"ours_sparse": 0.5, "grouped_mm": 2.0, "ours": 1.0, "cusparselt": 4.0}
    recs = sparse.case_records(c, counts, gu, dn, times, CEIL, 1e-3, "ran")
    assert [r["baseline"] for r in recs] == ["grouped_mm", "ours", "cusparselt"]
    assert [r["speedup"] for r in recs] == [4.0, 2.0, 8.0]
    r = recs[0]
    expert_bytes = sum(t[0].numel() * t.element_size() for w in (gu, dn) for t in (w.values, w.meta, w.block_idx))
    assert r["min_bytes"] == 2 * expert_bytes + 2 * 8 * H * 2  # 2 touched experts + x + out, bf16
    assert r["min_bytes"] < 0.4 * (2 * 3 * H * F * 2)  # 25 % of the values plus metadata: far below dense
    assert r["flops"] == 6 * 8 * 2 * H * F
    assert r["ours_tflops"] == pytest.approx(r["flops"] / 0.5e-3 / 1e12)
    assert r["frac_matmul_peak"] == pytest.approx(r["ours_tflops"] / CEIL["matmul_tflops"])
    assert r["frac_copy_bw"] == pytest.approx(r["min_bytes"] / 0.5e-3 / 1e12 / CEIL["copy_tbps"])
    assert r["baseline_tflops"] == pytest.approx(r["flops"] / 2e-3 / 1e12)
    assert (r["speedup_vs_grouped_mm"], r["speedup_vs_ours"]) == (4.0, 2.0)
    assert (r["touched_experts"], r["max_rows_per_expert"], r["ours_ms"]) == (2, 11, 0.5)
    assert r["density"] == 0.25 and (r["bn"], r["bm"], r["bw"], r["nominal_density"]) == (1, 2, 16, 0.25)
    assert r["times_ms"] == times and r["cusparselt_status"] == "ran"
    # the schema of the dense benchmark's records (bench/results/kernels_h100.json), less its dense-only fields
    dense = json.loads((Path(__file__).parents[1] / "bench/results/kernels_h100.json").read_text())["records"][0]
    assert set(dense) - {"block_n", "ours_fast_ms", "layout_ms"} <= set(r)


def test_sparse_record_density_is_the_true_one(gen):
    # 1:5 on 16 blocks keeps 3 + ceil(1/5) = 4 (1/8), on 24 blocks 4 + ceil(4/5) = 5 (5/48): not the nominal 10 %
    gu, dn = toy_weights(gen, density=0.1)
    r = sparse.case_records(toy_case(density=0.1), torch.tensor([8, 8, 0, 0]), gu, dn,
                            {"ours_sparse": 1.0, "grouped_mm": 1.0, "ours": 1.0}, CEIL, 0.0, "skipped")[0]
    assert (gu.density, dn.density) == (1 / 8, 5 / 48)
    assert r["density"] == pytest.approx((2 * gu.density + dn.density) / 3)  # gate/up has twice down's entries
    assert r["nominal_density"] == 0.1 and r["density"] > 0.11


# ------------------------------------------------------------------------------------------ reports
def fake_result(gen):
    """Records built by case_records from chosen times: known speedups and bandwidth fractions."""
    weights = {d: toy_weights(gen, density=d) for d in (0.5, 0.25, 0.1)}
    counts = torch.tensor([4096, 0, 0, 0])
    recs = []

    def add(c, d, speedup, frac_bw=None):
        gu, dn = weights[d]
        touched = int((counts > 0).sum())
        t = (sparse.compressed_bytes(gu, dn, touched, c.tokens, H) / (frac_bw * CEIL["copy_tbps"] * 1e12) * 1e3
             if frac_bw else 1.0 / speedup)
        times = {"ours_sparse": t, "grouped_mm": t * speedup, "ours": t * speedup / 2}
        recs.extend(sparse.case_records(c, counts, gu, dn, times, CEIL, 2e-3, "skipped: test"))

    for shape in ("model-a", "model-b"):
        for d, s in ((0.5, 2.0), (0.25, 3.0), (0.1, 8.0)):
            add(toy_case("real", shape, T=4096, k=1, density=d), d, s)
    add(toy_case("models", "model-a", T=16, density=0.25), 0.25, 1.5, frac_bw=0.9)
    add(toy_case("models", "model-b", T=16, density=0.25), 0.25, 1.5, frac_bw=0.5)
    for hidden, s in ((512, 1.0), (512, 4.0), (1024, 3.0)):
        add(sparse.Case("synthetic", f"h{hidden}", hidden, F, 4, 1, "uniform", 512, (0.25,), 16), 0.25, s)
    return {"gpu": "Fake GPU", "date": "2026-01-01", "ceilings": CEIL, "records": recs}


def test_target_summary_compares_prefill_geomeans_and_decode_bandwidth_with_the_targets(gen):
    text = sparse.target_summary(fake_result(gen)["records"])
    assert "prefill real       50%: geomean 2.00x over grouped_mm (2 cases, T >= 4096); target 1.6x met" in text
    assert "prefill real       25%: geomean 3.00x over grouped_mm (2 cases, T >= 4096); target 3.2x MISSED" in text
    assert "prefill real       10%: geomean 8.00x" in text and "target 7.0x met" in text
    assert "decode  models     25%: 50%..90% of copy BW on compressed bytes (median 70%); 1/2 cases >= 80%" in text
    assert "synthetic" not in text  # 512 tokens: neither prefill nor decode


def test_table_has_a_row_per_case_and_a_line_per_synthetic_hidden_size(gen):
    lines = sparse.format_sparse_table(fake_result(gen)).splitlines()
    assert "Fake GPU" in lines[0] and "50% xgrp" in lines[1] and "10% xgrp" in lines[1]
    rows = [line for line in lines if line.startswith(("r:", "m:"))]
    assert len(rows) == 4  # real model-a/b at 4096, models model-a/b at 16
    real_a = next(line for line in rows if line.startswith("r:model-a/uniform"))
    assert real_a.split()[3:6] == ["0.5000", "nan", "2.00"]  # ours ms, no cuSPARSELt, 50 %: 2x over grouped_mm
    models_a = next(line for line in rows if line.startswith("m:model-a/uniform"))
    assert models_a.split()[5:8] == ["-", "-", "-"]  # no 50 % record for this case
    synth = [line for line in lines if line.startswith("synthetic")]
    assert len(synth) == 2 and "h=512" in synth[0] and "geomean 2.00x (1.00-4.00)" in synth[0]


def test_plots_write_pngs_next_to_the_results(gen, tmp_path):
    import matplotlib.image

    paths = sparse.plot_sparse(fake_result(gen), tmp_path, "paper_fake")
    assert [p.name for p in paths] == ["paper_fake_speedup.png", "paper_fake_synthetic.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0  # a drawn figure, not a blank


def test_bench_session_checks_the_device_and_logs_the_ceilings_it_measured(monkeypatch, tmp_path):
    import hare.gpu as hg

    monkeypatch.setattr(hg, "availability", lambda dev: (False, "no sm_90 here"))
    with pytest.raises(RuntimeError, match="no sm_90 here"):
        toolkit.BenchSession("cpu")
    monkeypatch.setattr(hg, "availability", lambda dev: (True, "ok"))
    monkeypatch.setattr(toolkit, "measure_ceilings", lambda dev: {"copy_tbps": 3.0, "matmul_tflops": 800.0})
    monkeypatch.setattr(toolkit, "Timer", lambda dev: ("timer", dev))
    log = tmp_path / "run.log"
    a, b = toolkit.BenchSession("cpu", seed=3, log=log), toolkit.BenchSession("cpu", seed=3)
    assert a.timer == ("timer", torch.device("cpu")) and a.ceil["copy_tbps"] == 3.0
    assert torch.equal(torch.rand(4, generator=a.gen), torch.rand(4, generator=b.gen))  # seeded alike
    a.say("case 1")
    a.close()
    b.say("not logged")  # no log file: a no-op
    assert log.read_text().splitlines() == [f"ceilings: {a.ceil}", "case 1"]


@pytest.mark.parametrize("bench,argv", [("launch", ["--tokens", "1"]), ("attention", ["--batches", "1"])])
def test_gpu_benches_refuse_without_a_gpu(bench, argv, monkeypatch, capsys):
    import importlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"hare.bench.{bench}").main(argv)
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_results_file_records_the_run_and_the_geometric_mean(tmp_path, capsys):
    from hare.bench.common import geomean, write_results

    assert geomean([2.0, 8.0]) == pytest.approx(4.0) and geomean(x for x in [3.0]) == pytest.approx(3.0)
    out = tmp_path / "sub" / "r.json"
    result = write_results("cpu", {"geomean_speedup": 1.5}, [{"case": "a"}], out)
    assert json.loads(out.read_text()) == result
    assert result["gpu"] == "cpu" and result["commit"] and result["records"] == [{"case": "a"}]
    assert json.loads(capsys.readouterr().out) == {"geomean_speedup": 1.5}


def test_results_are_saved_whole_with_the_suites_fields(tmp_path, capsys):
    from hare.bench.common import save_results, write_results

    out = tmp_path / "r.json"
    out.write_text("previous")
    result = write_results("cpu", {"x": 1.0}, [], out, ceilings=CEIL, wall_s=2.0)
    assert json.loads(out.read_text()) == result and result["ceilings"] == CEIL and result["wall_s"] == 2.0
    assert list(tmp_path.iterdir()) == [out]  # written through a temporary file and a rename
    capsys.readouterr()
    assert save_results({"records": [1]}, tmp_path / "new" / "s.json").read_text() == json.dumps({"records": [1]},
                                                                                                  indent=1)


def test_sparse_summary_is_the_geomean_speedup_per_suite_and_density(gen):
    s = sparse.summary(fake_result(gen)["records"])
    assert s["real/geomean_speedup_vs_grouped_mm_at_0.5"] == pytest.approx(2.0)
    assert s["real/geomean_speedup_vs_grouped_mm_at_0.1"] == pytest.approx(8.0)
    assert s["models/geomean_speedup_vs_grouped_mm_at_0.25"] == pytest.approx(1.5)
    assert s["synthetic/geomean_speedup_vs_grouped_mm_at_0.25"] == pytest.approx(12 ** (1 / 3))


def test_bench_suites_import_the_toolkit_not_each_other_nor_private_names():
    """The bench wing's layers: suites build on toolkit, baselines, common and shapes; only the kernels CLI reaches
    into the sparse and GPT-OSS suites (no cycle), and nothing imports a private name of another module."""
    import ast

    bench = Path(hare.__file__).parent / "bench"
    shared = {"toolkit", "baselines", "common", "shapes"}
    for path in bench.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                target = (node.module or "").split(".")[0] or {a.name for a in node.names}.pop()
                if target not in shared:
                    assert (path.stem, target) in {("kernels", "sparse"), ("kernels", "gpt_oss"),
                                                  ("accuracy", "trained_moe")}, (path, target)
            if isinstance(node, ast.ImportFrom):
                assert not [a.name for a in node.names if a.name.startswith("_")], (path, node.module)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
                assert node.value.id in {"self", "torch", "module", "type"}, (path, node.value.id, node.attr)


def test_model_shapes_read_from_the_real_configs_are_their_expert_layers():
    from hare.bench.shapes import expert_shape

    assert MODEL_SHAPES["qwen3-30b-a3b"] == expert_shape("Qwen3-30B-A3B") == (2048, 768, 128, 8)  # not the dense 6144
    assert MODEL_SHAPES["mixtral-8x7b"] == (4096, 14336, 8, 2)  # Mixtral's FFN is its experts
    assert MODEL_SHAPES["deepseek-v2-lite"] == (2048, 1408, 64, 6) and MODEL_SHAPES["qwen1.5-moe-a2.7b"][2:] == (60, 4)
