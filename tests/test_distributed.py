import json
import re
import subprocess

import pytest
import torch
import torch.distributed as dist

import hare
from hare.bench.ep import SHAPES
from hare.distributed import ep_group, plan_sends

from ep_workers import (bench_tiny, equals_single_process, mismatched_shards, packed_topk,
                        patched_model_equals_single_process, peer_dies_or_hangs, run_ranks)
from helpers import random_topk, rel_error


@pytest.mark.parametrize("world", [2, 4])
def test_ep_moe_equals_single_process(world, tmp_path):
    """Dense and BlockNM, float64 and bf16, top-k 1..8, uniform, uneven, skewed, zero-token and one-token ranks."""
    results = run_ranks(equals_single_process, world, tmp_path)
    assert all(v == "ok" for v in results.values()), results


def test_mismatched_shards_fail_on_every_rank(tmp_path):
    results = run_ranks(mismatched_shards, 2, tmp_path)
    for rank, message in results.items():
        assert "DistributedError" in message and "different expert shards" in message, (rank, message)


@pytest.mark.parametrize("mode", ["dies", "dies_in_setup", "hangs"])
def test_dead_or_hung_peer_fails_within_the_timeout(mode, tmp_path):
    timeout_s = 3.0
    results = run_ranks(peer_dies_or_hangs, 2, tmp_path, mode, timeout_s, str(tmp_path / "signal"), timeout=60,
                        wait_for=[0])
    match = re.match(r"DistributedError after ([\d.]+)s: .*rank 0: (group setup|header exchange|dispatch|combine) "
                     r"failed", results[0])
    assert match, results
    assert float(match.group(1)) < 3 * timeout_s + 5
    if mode == "dies_in_setup":
        assert match.group(2) == "group setup", results[0]


def test_ep_bench_runs_on_gloo(tmp_path):
    results = run_ranks(bench_tiny, 2, tmp_path)
    assert all(v == "ok" for v in results.values()), results


def test_patch_with_ep_group_equals_single_process(tmp_path):
    results = run_ranks(patched_model_equals_single_process, 2, tmp_path)
    assert all(v == "ok" for v in results.values()), results


def test_ep_moe_refuses_bad_bias_shards_before_any_collective():
    """No process group exists here: the refusal must come from the argument check, before any communication."""
    x, ids, w = torch.randn(3, 16), torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
    wg, wd = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    with pytest.raises(hare.InvalidArgumentError, match=r"gate_up_bias_local: expected shape \(2, 8\)"):
        hare.ep_moe(x, ids, w, wg, wd, gate_up_bias_local=torch.zeros(2, 9))
    with pytest.raises(hare.InvalidArgumentError, match=r"down_bias_local: expected shape \(2, 16\)"):
        hare.ep_moe(x, ids, w, wg, wd, down_bias_local=torch.zeros(3, 16))


@pytest.mark.parametrize("world,local,top_k", [(1, 4, 2), (2, 4, 2), (3, 2, 4), (4, 4, 8), (8, 1, 3)])
def test_send_plan_sends_each_token_once_per_rank(world, local, top_k):
    """Against a per-token loop: one row per (token, rank owning some of its experts), rank-major; each row lists
    exactly the token's experts on that rank with their weights in slot order; the combine reads each token's rows
    in rank order."""
    g = torch.Generator().manual_seed(world * 100 + top_k)
    for num_tokens, ids in ((0, torch.zeros(0, top_k, dtype=torch.long)), (1, random_topk(1, world * local, top_k, g)),
                            (23, random_topk(23, world * local, top_k, g)),
                            (23, packed_topk(23, world, local, top_k, g))):
        weights = torch.rand(num_tokens, top_k, generator=g, dtype=torch.float64)
        plan = plan_sends(ids, weights, world, local, torch.float64)
        pairs = sorted({(int(e) // local, t) for t in range(num_tokens) for e in ids[t]})
        assert plan.token.tolist() == [t for _, t in pairs]
        assert plan.send_rows == [sum(r == rank for r, _ in pairs) for rank in range(world)]
        slots = min(top_k, local)
        assert plan.local_ids.shape == plan.weights.shape == (len(pairs), slots)
        for row, (rank, t) in enumerate(pairs):
            mine = [j for j in range(top_k) if ids[t, j] // local == rank]
            pad = slots - len(mine)
            assert plan.local_ids[row].tolist() == [int(ids[t, j]) % local for j in mine] + [-1] * pad
            assert plan.weights[row].tolist() == [float(weights[t, j]) for j in mine] + [0.0] * pad
        for t in range(num_tokens):
            rows = [row for row, (_, tok) in enumerate(pairs) if tok == t]
            assert plan.return_index[t].tolist() == rows + [-1] * (min(world, top_k) - len(rows))


@pytest.mark.parametrize("hidden,dtype", [(33, torch.bfloat16), (5, torch.float16), (7, torch.float32),
                                          (3, torch.float64)])
def test_dispatch_rows_carry_routing_in_place(hidden, dtype):
    """Odd widths: every part of a dispatch row is aligned for an in-place view, and reads back what was packed."""
    from hare.distributed import _Wire

    g = torch.Generator().manual_seed(hidden)
    wire = _Wire(hidden, dtype, slots=3)
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weights = torch.rand(6, 3, generator=g, dtype=torch.float64).to(cdt)
    ids = torch.randint(-1, 9, (6, 3), generator=g, dtype=torch.int32)
    x = torch.randn(6, hidden, generator=g, dtype=torch.float64).to(dtype)
    buf = wire.pack(weights, ids, x)
    assert buf.dtype == torch.uint8 and buf.shape == (6, wire.width) and wire.width % 8 == 0
    assert wire.width < 3 * (cdt.itemsize + 4) + hidden * dtype.itemsize + 16  # at most the alignment padding
    for got, want in zip(wire.views(buf), (weights, ids, x)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_header_check_names_what_differs():
    from hare.distributed import _check_headers

    mine = [0x4A4E, 4, 32, 48, 1, 2]
    _check_headers(torch.tensor([mine, mine]), mine, rank=0)
    with pytest.raises(hare.DistributedError, match=r"ranks \[1\] hold different .*rank 1: top-k 8 there, 2 here"):
        _check_headers(torch.tensor([mine, mine[:5] + [8]]), mine, rank=0)
    other = [0x4A4E, 4, 32, 48, 3, 2]
    with pytest.raises(hare.DistributedError, match=r"ranks \[0, 2\] .*dtype torch.float64 there, torch.bfloat16 here"):
        _check_headers(torch.tensor([other, mine, other]), mine, rank=1)


@pytest.fixture
def one_rank_group(tmp_path):
    """The default process group over this process alone (gloo): the whole EP step runs, all rows stay local."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield ep_group(timeout_s=10)
    dist.destroy_process_group()


def test_one_rank_group_equals_moe_and_sends_nothing_to_peers(one_rank_group):
    from hare.distributed import combine, dispatch, run_local_experts

    g = torch.Generator().manual_seed(3)
    wg, wd = torch.randn(4, 16, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, 8, generator=g,
                                                                                  dtype=torch.float64)
    for tokens in (0, 1, 13):
        x = torch.randn(tokens, 8, generator=g, dtype=torch.float64)
        ids, w = random_topk(tokens, 4, 3, g), torch.rand(tokens, 3, generator=g, dtype=torch.float64)
        d = dispatch(x, ids, w, wg, wd, one_rank_group)
        assert d.recv_rows == d.plan.send_rows == [tokens] and d.peer_bytes() == (0, 0)
        out = combine(run_local_experts(d, wg, wd), d, one_rank_group)
        ref = hare.moe(x, ids, w, wg, wd)
        assert out.shape == ref.shape and (tokens == 0 or rel_error(out, ref) < 1e-12)
        assert torch.equal(out, hare.ep_moe(x, ids, w, wg, wd, group=one_rank_group))


def test_shard_experts_keeps_the_block_nm_format(one_rank_group):
    """A rank's shard of a Block N:M weight keeps its ratio, block width and joint-panel pairing, and its values."""
    w = hare.sparsify(torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(0)), bn=1, bm=2, bw=16,
                      joint="halves")
    shard = hare.shard_experts(w, one_rank_group)
    assert (shard.bn, shard.bm, shard.bw, shard.joint) == (1, 2, 16, "halves")
    assert torch.equal(shard.to_dense(), w.to_dense()) and shard.values.data_ptr() != w.values.data_ptr()
    shard.check()


@pytest.mark.parametrize("error", [dist.DistBackendError, RuntimeError])
def test_every_collective_failure_names_its_phase(one_rank_group, monkeypatch, error):
    """Whatever the backend raises (a DistError or a plain RuntimeError such as Gloo's), at any collective of a step
    or in the group's setup, the caller gets DistributedError naming that phase."""
    real = dist.all_to_all_single
    x, ids, w = torch.randn(5, 8), torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2]]), torch.rand(5, 2)
    wg, wd = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    for fail_at, phase in enumerate(("header exchange", "dispatch", "combine")):
        calls = []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) > fail_at:
                raise error("Connection closed by peer [127.0.0.1]:1234")
            return real(*args, **kwargs)

        monkeypatch.setattr(dist, "all_to_all_single", flaky)
        with pytest.raises(hare.DistributedError, match=f"rank 0: {phase} failed.*Connection closed by peer"):
            hare.ep_moe(x, ids, w, wg, wd, group=one_rank_group)
    def unreachable_peer(**kwargs):
        raise error("connectFullMesh failed")

    monkeypatch.setattr(dist, "new_group", unreachable_peer)
    with pytest.raises(hare.DistributedError, match="rank 0: group setup failed.*connectFullMesh failed"):
        ep_group(timeout_s=1)


def test_ep_group_refuses_bad_arguments_before_any_setup():
    with pytest.raises(hare.InvalidArgumentError, match="timeout_s: expected a positive number"):
        ep_group(timeout_s=0)
    with pytest.raises(hare.InvalidArgumentError, match="timeout_s"):
        ep_group(timeout_s=float("nan"))
    with pytest.raises(hare.DistributedError, match="init_process_group first"):
        ep_group()


def test_ep_moe_refuses_bad_ids_before_any_collective(one_rank_group, monkeypatch):
    monkeypatch.setattr(dist, "all_to_all_single", lambda *a, **k: pytest.fail("a collective ran"))
    x, w, wg, wd = torch.randn(2, 8), torch.rand(2, 2), torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    with pytest.raises(hare.InvalidArgumentError, match=r"expert ids must lie in \[0, 4\)"):
        hare.ep_moe(x, torch.tensor([[0, 1], [2, 4]]), w, wg, wd, group=one_rank_group)
    with pytest.raises(hare.InvalidArgumentError, match="routed to the same expert twice"):
        hare.ep_moe(x, torch.tensor([[0, 1], [2, 2]]), w, wg, wd, group=one_rank_group)


def test_bench_ep_cli_runs_gloo_ranks_and_records_the_traffic(tmp_path):
    """`hare bench ep --cpu`: torchrun, two gloo ranks, dense and Block 1:2 experts, the results file with backend,
    world and bytes per step; the traffic depends on the routing only, not on the weights' density."""
    from typer.testing import CliRunner

    from hare.cli import app

    out = tmp_path / "ep.json"
    run = CliRunner().invoke(app, ["bench", "ep", "--cpu", "--shapes", "small", "--tokens", "0,5", "--iters", "1",
                                   "--densities", "1.0,0.25", "--out-json", str(out)])
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert (result["backend"], result["world"], result["gpu"]) == ("gloo", 2, "cpu") and result["commit"]
    assert result["date"]
    records = result["records"]
    assert [(r["case"], r["density"], r["tokens"]) for r in records] == [
        ("small/ep2", d, t) for d in (1.0, 0.25) for t in (0, 5)]
    hidden, _, _, top_k = SHAPES["small"]
    for empty, five in (records[:2], records[2:]):
        assert empty["dispatch_bytes"] == empty["combine_bytes"] == 0
        sent = five["combine_bytes"] // (2 * hidden)  # bf16 rows to the other rank, both ranks
        assert 0 < sent <= 2 * 5 and five["dispatch_bytes"] == sent * (2 * hidden + 8 * top_k)
        assert five["dispatch_gbps"] == five["dispatch_bytes"] / five["dispatch_ms"] / 1e6
    assert (records[1]["dispatch_bytes"], records[1]["combine_bytes"]) == (records[3]["dispatch_bytes"],
                                                                          records[3]["combine_bytes"])
    assert result["summary"]["combine_bytes"] == 2 * records[1]["combine_bytes"]
    assert set(result["summary"]["step_vs_all_experts_geomean"]) == {"1.0", "0.25"}


@pytest.mark.parametrize("option,value,message", [("--shapes", "small,nope", r"shapes: unknown \['nope'\]"),
                                                  ("--tokens", "16,x", "tokens: '16,x' is not"),
                                                  ("--densities", "1.0,0.3", r"densities: '1.0,0.3'; expected"),
                                                  ("--densities", "0.25,0.25", "expected distinct values"),
                                                  ("--densities", "dense", r"from \[1.0, 0.5, 0.25, 0.1, 0.05\]")])
def test_bench_ep_refuses_bad_options_before_starting_ranks(option, value, message, monkeypatch):
    from typer.testing import CliRunner

    from hare.cli import app

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ranks were started"))
    run = CliRunner().invoke(app, ["bench", "ep", "--cpu", option, value])
    assert run.exit_code == 2 and re.search(message, run.output), run.output


def test_bench_ep_passes_only_the_given_options_to_its_ranks(monkeypatch):
    """Defaults live in hare.bench.ep alone: the CLI forwards what was given, and the ranks' parser takes it."""
    from typer.testing import CliRunner

    from hare.bench.ep import DEFAULT_DENSITIES, DEFAULT_SHAPES, TOKENS, parse_options
    from hare.cli import app

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    run = CliRunner().invoke(app, ["bench", "ep", "--cpu", "--densities", "0.25"])
    assert run.exit_code == 0, run.output
    cmd = calls[0]
    assert cmd[cmd.index("-m", 3) + 1:] == ["hare.bench.ep", "--iters", "10", "--densities", "0.25"]
    assert "--nproc-per-node=2" in cmd
    shapes, tokens, densities = parse_options()
    assert (tuple(shapes), tuple(tokens), tuple(densities)) == (DEFAULT_SHAPES, TOKENS, DEFAULT_DENSITIES)
    assert {"mixtral-8x7b", "qwen3-30b-a3b"} <= set(DEFAULT_SHAPES) and TOKENS == (1, 128, 4096)


def test_bench_ep_names_its_gpu_results_file_like_the_other_suites():
    from hare.bench.ep import default_out_json

    assert str(default_out_json("NVIDIA H200", 8)) == "bench/results/ep_h200x8.json"
    assert str(default_out_json("NVIDIA H100 80GB HBM3", 2)) == "bench/results/ep_h100x2.json"
