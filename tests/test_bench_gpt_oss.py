"""The GPT-OSS-20B cases of the benchmarks, CPU side: the kernel suite's layer, weights, run loop (on the reference
path, a small layer, a host-clock timer), records, reports and options; the model benchmark's GPT-OSS-20B config."""

import json
import math
import time

import pytest
import torch

import hare
from hare.bench import gpt_oss, kernels, toolkit
from hare.bench.common import geomean
from hare.blocknm import DENSITIES, PANEL
from hare.models.configs import REAL, real_config

SMALL = (64, 160, 4, 2)  # hidden, ffn (one full and one partial panel per half), experts, top-k
TOKENS = (1, 8)
CEIL = {"matmul_tflops": 100.0, "copy_tbps": 2.0, "read_tbps": 2.0}
SCHEMA = {"bench", "case", "density", "tokens", "ours_ms", "baseline", "baseline_ms", "speedup", "shape", "routing",
          "hidden", "ffn", "experts", "top_k", "touched_experts", "max_rows_per_expert", "flops", "min_bytes",
          "baseline_tflops", "ours_tflops", "ours_tbps", "frac_matmul_peak", "frac_copy_bw", "rel_err_vs_grouped_mm"}


class HostTimer:
    """Stands in for the CUDA-graph timer: one call, timed on the host clock."""

    def __init__(self, device):
        pass

    def time_graph(self, fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The suite run on the CPU over the small layer at every density, written to a results file (the plot it asks
    for is drawn by test_summary_table_and_plot_of_a_run)."""
    import hare.gpu as hg

    out = tmp_path_factory.mktemp("gpt_oss") / "kernels_gpt-oss_cpu.json"
    plots = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hg, "availability", lambda dev: (True, ""))
        mp.setattr(gpt_oss, "plot", lambda *args: plots.append(args))
        mp.setattr(toolkit, "measure_ceilings", lambda dev: CEIL)
        mp.setattr(toolkit, "Timer", HostTimer)
        result = gpt_oss.run_gpt_oss_bench(tokens=TOKENS, layer=SMALL, device="cpu", out_json=out,
                                           print_table=False)
    assert plots == [(result, out.parent, "kernels_gpt-oss_cpu")]  # beside the JSON, named after it
    return result, out


# ------------------------------------------------------------------------------------------ the kernel case
def test_the_case_is_gpt_oss_20b_experts_with_float32_biases_and_the_models_own_gated_unit():
    assert gpt_oss.LAYER == (2880, 2880, 32, 4)  # hidden, ffn, experts, top-k, read from the model config
    assert gpt_oss.DENSITY_CASES == (1.0, 0.5, 0.25, 0.1, 0.05)
    assert {1, 16, 128} <= set(gpt_oss.TOKENS) and {512, 2048, 8192} <= set(gpt_oss.TOKENS)
    H, F, E, _ = gpt_oss.LAYER
    gu_bias, down_bias = gpt_oss.make_biases(E, H, F, "cpu", torch.Generator().manual_seed(0))
    assert (gu_bias.shape, down_bias.shape) == ((E, 2 * F), (E, H))
    assert gu_bias.dtype == down_bias.dtype == torch.float32
    assert bool((gu_bias != 0).all()) and bool((down_bias != 0).all())
    assert gu_bias.std().item() == pytest.approx(gpt_oss.BIAS_STD, rel=0.02)
    # the activation is the one hare.patch reads off GPT-OSS's experts: the model's clamped SwiGLU
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(real_config("GPT-OSS-20B", num_layers=1), dtype=torch.bfloat16)
    hare.patch(model)
    experts = model.model.layers[0].mlp.experts
    assert experts.activation == gpt_oss.ACTIVATION
    assert tuple(experts.gate_up_bias.shape) == (E, 2 * F) and tuple(experts.down_bias.shape) == (E, H)


def test_sparse_weights_prune_gate_up_in_halves_and_down_plain_across_chunks(monkeypatch, gen):
    H, F, E, _ = SMALL
    wgu, wd = toolkit.make_weights(E, H, F, "cpu", gen)
    monkeypatch.setattr(toolkit, "CHUNK_ELEMS", 2 * 2 * F * H)  # two experts per sparsify call
    for density in (0.25, 0.05):
        gu, dn = gpt_oss.sparse_weights(wgu, wd, density)
        assert gu.halves and not dn.halves and (gu.bn, gu.bm) == (dn.bn, dn.bm) == DENSITIES[density]
        # each half (gate, up) in its own panels: 2 x ceil(160 / 128), where the plain layout has ceil(320 / 128)
        assert gu.block_idx.shape[1] == 2 * math.ceil(F / PANEL) == 4 and dn.block_idx.shape[1] == 1
        whole = hare.sparsify(wgu, bn=gu.bn, bm=gu.bm, bw=16, halves=True)
        assert torch.equal(gu.to_dense(), whole.to_dense()) and torch.equal(gu.block_idx, whole.block_idx)
        assert torch.equal(dn.to_dense(), hare.sparsify(wd, bn=dn.bn, bm=dn.bm, bw=16).to_dense())


def test_a_cpu_run_records_every_density_and_token_count_with_the_kernel_schema(cpu_run):
    result, out = cpu_run
    recs = result["records"]
    assert result["errors"] == [] and json.loads(out.read_text()) == result
    assert {"gpu", "date", "commit", "ceilings"} <= set(result) and result["suites"] == ["gpt-oss"]
    assert [(r["nominal_density"], r["tokens"]) for r in recs] == [(d, T) for d in gpt_oss.DENSITY_CASES
                                                                  for T in TOKENS]
    H, F, E, k = SMALL
    for r in recs:
        assert SCHEMA <= set(r)
        assert r["bench"] == "kernels" and r["case"] == "gpt-oss-20b/uniform" and r["baseline"] == "grouped_mm"
        assert (r["hidden"], r["ffn"], r["experts"], r["top_k"]) == SMALL and r["activation"] == "gpt-oss"
        assert r["biases"] == {"gate_up_bias": [E, 2 * F], "down_bias": [E, H]} and r["bias_dtype"] == "float32"
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ours_ms"])
        assert r["flops"] == 6 * r["tokens"] * k * H * F
        assert r["path"] == "reference" and r["rel_err_vs_grouped_mm"] < 2e-2
        assert r["halves_gate_up"] == (r["nominal_density"] < 1)
    dense = [r for r in recs if r["nominal_density"] == 1.0]
    assert all(r["density"] == 1.0 and r["bn"] is None for r in dense)
    # the fewest bytes: the touched experts' bf16 weights and float32 biases, x and out
    assert dense[0]["min_bytes"] == dense[0]["touched_experts"] * (3 * H * F * 2 + (2 * F + H) * 4) + 2 * 1 * H * 2


def test_sparse_records_carry_the_measured_density_not_the_nominal_one(cpu_run):
    # hidden 64 is 4 blocks of 16, ffn 160 is 10: 1:5 keeps ceil(4/5) = 1 block of gate/up (1/8) and 2 of down (1/10),
    # 1:10 keeps 1 and 1 (1/8, 1/20)
    kept = {0.5: (4, 10), 0.25: (2, 5), 0.1: (1, 2), 0.05: (1, 1)}  # blocks of 16 kept: gate/up, down
    for r in cpu_run[0]["records"]:
        d = r["nominal_density"]
        if d == 1.0:
            continue
        gu, dn = kept[d][0] * 8 / 64, kept[d][1] * 8 / 160
        assert (r["density_gate_up"], r["density_down"]) == pytest.approx((gu, dn))
        assert r["density"] == pytest.approx((2 * gu + dn) / 3)  # gate/up holds twice down's entries
    assert cpu_run[0]["records"][-1]["density"] == pytest.approx((2 / 8 + 1 / 20) / 3)  # 10 %, not the nominal 5 %


def test_summary_table_and_plot_of_a_run(cpu_run):
    result, out = cpu_run
    s = result["summary"]
    assert set(s) == {f"gpt-oss/decode/geomean_speedup_vs_grouped_mm_at_{d:g}" for d in gpt_oss.DENSITY_CASES}
    at_25 = [r["speedup"] for r in result["records"] if r["nominal_density"] == 0.25]
    assert s["gpt-oss/decode/geomean_speedup_vs_grouped_mm_at_0.25"] == pytest.approx(geomean(at_25))
    lines = gpt_oss.format_table(result).splitlines()
    assert "dense" in lines[1] and "5%" in lines[1]
    assert [line.split()[1] for line in lines[2:4]] == ["1", "8"]
    assert lines[4] == "dense: reference (tensors on cpu)" and len(lines) == 4 + len(gpt_oss.DENSITY_CASES)
    png = gpt_oss.plot(result, out.parent, "plotted")
    assert png == out.parent / "plotted.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_hare_moe_call_is_recorded_and_the_other_densities_still_run(monkeypatch, tmp_path):
    import hare.gpu as hg

    real_moe = gpt_oss.moe

    def moe(x, ids, w, gu, dn, *args, **kwargs):
        if isinstance(gu, hare.BlockNM) and gu.bm == 2:
            raise RuntimeError("no kernel for 1:2")
        return real_moe(x, ids, w, gu, dn, *args, **kwargs)

    monkeypatch.setattr(gpt_oss, "moe", moe)
    monkeypatch.setattr(hg, "availability", lambda dev: (True, ""))
    monkeypatch.setattr(toolkit, "measure_ceilings", lambda dev: CEIL)
    monkeypatch.setattr(toolkit, "Timer", HostTimer)
    result = gpt_oss.run_gpt_oss_bench(densities=(1.0, 0.25, 0.1), tokens=(4,), layer=SMALL, device="cpu",
                                       print_table=False)
    assert [r["nominal_density"] for r in result["records"]] == [1.0, 0.1]
    assert result["errors"] == [{"case": "gpt-oss-20b/uniform", "suite": "gpt-oss", "tokens": 4, "density": 0.25,
                                 "bw": 16, "error": "RuntimeError: no kernel for 1:2"}]


def test_kernels_cli_selects_the_gpt_oss_suite_with_its_options(monkeypatch):
    calls = []

    def fake_run(errors=(), **kw):
        calls.append(kw)
        return {"errors": list(errors)}

    monkeypatch.setattr(gpt_oss, "run_gpt_oss_bench", fake_run)
    kernels.main(["--suite", "gpt-oss", "--out-json", "g.json"])
    kernels.main(["--suite", "gpt-oss", "--density", "0.25", "--tokens", "1", "8192", "--bw", "32",
                  "--routing", "zipf"])
    assert calls[0]["densities"] == (1.0, 0.5, 0.25, 0.1, 0.05) and calls[0]["tokens"] == gpt_oss.TOKENS
    assert calls[0]["routings"] == ("uniform",) and calls[0]["out_json"] == "g.json" and calls[0]["bw"] == 16
    assert (calls[1]["densities"], calls[1]["tokens"], calls[1]["bw"], calls[1]["routings"]) == \
        ((1.0, 0.25), [1, 8192], 32, ["zipf"])
    for argv in (["--suite", "gpt-oss", "real"], ["--suite", "gpt-oss", "--shapes", "qwen3-30b-a3b"],
                 ["--suite", "gpt-oss", "--density", "0.3"], ["--suite", "gpt-oss", "--no-baselines"]):
        with pytest.raises(SystemExit) as exc:
            kernels.main(argv)
        assert exc.value.code == 2, argv
    monkeypatch.setattr(gpt_oss, "run_gpt_oss_bench", lambda **kw: fake_run(errors=[{"x": 1}], **kw))
    with pytest.raises(SystemExit) as exc:  # a failed call fails the run
        kernels.main(["--suite", "gpt-oss"])
    assert "1 hare.moe call" in str(exc.value.code)


# ------------------------------------------------------------------------------------------ the model config
def test_gpt_oss_20b_model_config_is_the_published_model():
    config = real_config("GPT-OSS-20B")
    assert REAL["GPT-OSS-20B"][0] == "gpt_oss" == config.model_type
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2880, 2880, 24)
    assert (config.num_local_experts, config.num_experts_per_tok, config.vocab_size) == (32, 4, 201088)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (64, 8, 64)
    assert config.sliding_window == 128 and config.swiglu_limit == 7.0
    assert config.layer_types == ["sliding_attention", "full_attention"] * 12
    assert real_config("GPT-OSS-20B", num_layers=3).layer_types == ["sliding_attention", "full_attention",
                                                                    "sliding_attention"]
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        one = AutoModelForCausalLM.from_config(real_config("GPT-OSS-20B", num_layers=1))
    layer = sum(p.numel() for n, p in one.named_parameters() if ".layers." in n)
    rest = sum(p.numel() for n, p in one.named_parameters() if ".layers." not in n)
    experts = sum(p.numel() for n, p in one.named_parameters() if ".experts." in n)
    total = rest + 24 * layer
    active = total - 24 * experts * (1 - 4 / 32)
    assert rest == 2 * 201088 * 2880 + 2880  # untied embedding and LM head, the final norm
    assert 20.8e9 < total < 21.0e9  # the published 20.9B
    assert 3.5e9 < active - 201088 * 2880 < 3.7e9  # and 3.6B active per token, the input embedding aside


def test_gpt_oss_20b_model_config_builds_on_the_cpu_and_patches_to_its_own_logits():
    from hare.bench.model import _build

    small = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=128, num_local_experts=4)
    config = real_config("GPT-OSS-20B", num_layers=2, **small)
    assert (config.sliding_window, config.rope_parameters["rope_type"], config.num_experts_per_tok) == (128, "yarn", 4)
    model = _build(config, torch.device("cpu"), torch.float32, "hare")
    with torch.no_grad():
        for name, p in model.named_parameters():  # experts that matter next to the residual stream
            if ".experts." in name:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        hare.patch(model)
        after = model(input_ids=ids).logits
    assert type(model.model.layers[1].mlp.experts).__name__ == "HareExperts"
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
