import re

import pytest

from ep_workers import (bench_tiny, equals_single_process, mismatched_shards, patched_model_equals_single_process,
                        peer_dies_or_hangs, run_ranks)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_moe_equals_single_process(world, tmp_path):
    """Dense and BlockNM, float64 and bf16, top-k 1..8, uniform, uneven, skewed, zero-token and one-token ranks."""
    results = run_ranks(equals_single_process, world, tmp_path)
    assert all(v == "ok" for v in results.values()), results


def test_mismatched_shards_fail_on_every_rank(tmp_path):
    results = run_ranks(mismatched_shards, 2, tmp_path)
    for rank, message in results.items():
        assert "DistributedError" in message and "different expert shards" in message, (rank, message)


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_dead_or_hung_peer_fails_within_the_timeout(mode, tmp_path):
    timeout_s = 4.0
    results = run_ranks(peer_dies_or_hangs, 2, tmp_path, mode, timeout_s, timeout=60, wait_for=[0])
    match = re.match(r"DistributedError after ([\d.]+)s", results[0])
    assert match, results
    assert float(match.group(1)) < 3 * timeout_s + 5


def test_ep_bench_runs_on_gloo(tmp_path):
    results = run_ranks(bench_tiny, 2, tmp_path)
    assert all(v == "ok" for v in results.values()), results


def test_patch_with_ep_group_equals_single_process(tmp_path):
    results = run_ranks(patched_model_equals_single_process, 2, tmp_path)
    assert all(v == "ok" for v in results.values()), results


def test_ep_moe_refuses_bad_bias_shards_before_any_collective():
    """No process group exists here: the refusal must come from the argument check, before any communication."""
    import torch

    import hare

    x, ids, w = torch.randn(3, 16), torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
    wg, wd = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    with pytest.raises(hare.InvalidArgumentError, match=r"gate_up_bias_local: expected shape \(2, 8\)"):
        hare.ep_moe(x, ids, w, wg, wd, gate_up_bias_local=torch.zeros(2, 9))
    with pytest.raises(hare.InvalidArgumentError, match=r"down_bias_local: expected shape \(2, 16\)"):
        hare.ep_moe(x, ids, w, wg, wd, down_bias_local=torch.zeros(3, 16))
