"""`hare bench overhead` on the CPU: its records, summary and results file (the reference path stands in for the
kernels; no graphs), and the CLI's refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from hare.bench import overhead
from hare.cli import app


def test_overhead_records_every_case_twice_and_summarises_the_id_check(tmp_path, capsys):
    out = tmp_path / "overhead_cpu.json"
    result = overhead.run(shapes=[(64, 32, 4, 2)], tokens=(1, 3), densities=(1.0, 0.25), out_json=out,
                          device="cpu", batches=2, per=2, calls=2)
    assert json.loads(out.read_text()) == result
    assert result["gpu"] == "cpu" and result["commit"] and result["date"]
    assert result["targets"] == {"host_us": overhead.TARGET_HOST_US, "check_us": overhead.TARGET_CHECK_US}
    recs = result["records"]
    assert len(recs) == 2 * 2 * 2 == len({r["case"] for r in recs})
    assert {(r["tokens"], r["density"], r["check_ids"]) for r in recs} == \
        {(t, d, c) for t in (1, 3) for d in (1.0, 0.25) for c in (False, True)}
    assert all(r["host_us"] > 0 and r["wall_us"] is None and r["graph_us"] is None for r in recs)
    s = result["summary"]
    assert s["max_host_us_check1"] == max(r["host_us"] for r in recs if r["check_ids"])
    assert "max_check_cost_host_us" in s and "max_check_cost_wall_us" not in s  # no wall times on the CPU
    assert isinstance(s["host_target_met"], bool) and isinstance(s["check_target_met"], bool)
    assert "check_ids=1" in capsys.readouterr().out


def test_the_summary_pairs_each_case_with_and_without_the_check():
    rec = lambda case, check, host, wall: {"case": f"{case}/check{int(check)}", "check_ids": check,  # noqa: E731
                                           "host_us": host, "wall_us": wall}
    s = overhead.summary([rec("a/T1", False, 30.0, 50.0), rec("a/T1", True, 33.0, 58.0),
                          rec("a/T64", False, 35.0, 60.0), rec("a/T64", True, 45.0, 61.0)])
    assert s["max_host_us_check0"] == 35.0 and s["max_host_us_check1"] == 45.0
    assert s["max_check_cost_host_us"] == 10.0 and s["max_check_cost_wall_us"] == 8.0
    assert s["host_target_met"] is False and s["check_target_met"] is True


def test_the_default_shape_is_qwen3s_experts_with_the_issues_32_experts_top4():
    assert overhead.SHAPES == {"qwen3-30b-a3b-e32k4": (2048, 768, 32, 4)}
    assert overhead.TOKENS == (1, 16, 64, 128) and overhead.DENSITIES == (1.0, 0.25)


def test_the_overhead_bench_refuses_without_a_gpu_and_bad_options(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        overhead.main(["--tokens", "1"])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["bench", "overhead"])
    assert result.exit_code != 0 and "needs a CUDA GPU" in result.output
    result = CliRunner().invoke(app, ["bench", "overhead", "--densities", "0.3"])
    assert result.exit_code != 0 and "densities 1.0 or one of" in result.output
