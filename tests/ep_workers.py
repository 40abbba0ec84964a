"""Rank programs for the expert-parallel tests, run in spawned processes over gloo."""

import os
import time
import traceback

import torch
import torch.distributed as dist

import hare
from hare.distributed import ep_group, ep_moe, shard_experts

from helpers import random_topk, rel_error


def run_ranks(target, world: int, tmp_path, *args, timeout: float = 120.0, wait_for=None) -> dict:
    """Start ``world`` spawned ranks of ``target``; return {rank: "ok" | error text | "no report"}.

    Waits for the reports of the ranks in ``wait_for`` (all by default), at most ``timeout`` seconds, then ends all.
    """
    wait_for = set(range(world) if wait_for is None else wait_for)
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    store = f"file://{tmp_path}/store"
    procs = [ctx.Process(target=_entry, args=(target, r, world, store, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    while not wait_for <= results.keys() and time.monotonic() < deadline:
        try:
            rank, message = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            results[rank] = message
        except Exception:
            break
    for p in procs:
        p.join(timeout=1)
        if p.is_alive():
            p.kill()
    return {r: results.get(r, "no report") for r in range(world)}


def _entry(target, rank, world, store, queue, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        target(rank, world, queue, *args)
        queue.put((rank, "ok"))
    except BaseException:
        queue.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def make_weights(experts, hidden, ffn, dtype, sparse):
    g = torch.Generator().manual_seed(7)  # the same full weights on every rank
    wg = torch.randn(experts, 2 * ffn, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    wd = torch.randn(experts, hidden, ffn, generator=g, dtype=torch.float64) / ffn ** 0.5
    if sparse:
        return hare.sparsify(wg, bn=1, bm=2, dtype=dtype), hare.sparsify(wd, bn=1, bm=2, dtype=dtype)
    return wg.to(dtype), wd.to(dtype)


def packed_topk(num_tokens, world, local, top_k, gen):
    """Each token prefers one random rank's experts: its first min(k, local) experts share that rank."""
    home = torch.randint(0, world, (num_tokens, 1), generator=gen)
    logits = torch.rand(num_tokens, world * local, generator=gen)
    return (logits + (torch.arange(world * local) // local == home)).topk(top_k, dim=1).indices


def spread_topk(skew):
    return lambda t, world, local, top_k, g: random_topk(t, world * local, top_k, g, skew=skew)


SCENARIOS = {
    # name: (tokens on rank r, routing of t tokens over world ranks of local experts)
    "uniform": (lambda r: 40, spread_topk(0.0)),
    "uneven": (lambda r: 3 + 50 * r, spread_topk(0.0)),
    "skewed": (lambda r: 64, spread_topk(8.0)),  # nearly everything to rank 0's experts; other shards mostly empty
    "zero_tokens_on_rank_0": (lambda r: 0 if r == 0 else 17, spread_topk(0.0)),
    "one_token": (lambda r: 1, spread_topk(0.0)),
    # a token's experts share a rank, so each of its rows carries several experts
    "shared_ranks": (lambda r: 40, packed_topk),
    "shared_ranks_uneven": (lambda r: (1, 0, 29, 5)[r % 4], packed_topk),
}


CASES = [(torch.float64, False, 2), (torch.float64, True, 3), (torch.bfloat16, False, 1), (torch.bfloat16, True, 8)]


def equals_single_process(rank, world, queue):
    for dtype, sparse, top_k in CASES:
        _equals_single_process(rank, world, dtype, sparse, top_k)


def _equals_single_process(rank, world, dtype, sparse, top_k):
    experts, hidden, ffn = 4 * world, 32, 48
    wg, wd = make_weights(experts, hidden, ffn, dtype, sparse)
    local_gu, local_d = shard_experts(wg), shard_experts(wd)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    for name, (tokens, routing) in SCENARIOS.items():
        g = torch.Generator().manual_seed(1000 * rank + len(name))
        t = tokens(rank)
        x = torch.randn(t, hidden, generator=g, dtype=torch.float64).to(dtype)
        ids = routing(t, world, experts // world, top_k, g)
        w = torch.rand(t, top_k, generator=g, dtype=torch.float64).to(dtype)
        out = ep_moe(x, ids, w, local_gu, local_d)
        ref = hare.moe(x, ids, w, wg, wd)
        assert out.shape == ref.shape == (t, hidden) and out.dtype == dtype, name
        if t:
            err = rel_error(out, ref)
            assert err < tol, f"{name}, {dtype}, sparse={sparse}, k={top_k}: rank {rank} relative error {err}"


def mismatched_shards(rank, world, queue):
    local = 2 + rank  # rank 1 holds one expert more
    wg, wd = torch.randn(local, 16, 8), torch.randn(local, 8, 8)
    ids = torch.zeros(4, 1, dtype=torch.long)
    ep_moe(torch.randn(4, 8), ids, torch.ones(4, 1), wg, wd)


def peer_dies_or_hangs(rank, world, queue, mode, timeout_s, signal_file):
    """Rank 1 exits while the group is being set up ("dies_in_setup"), right after it ("dies", racing rank 0's own
    setup or its first collective), or sleeps ("hangs"); rank 0 must raise DistributedError, whatever the timing."""
    if rank == 1:
        if mode == "dies_in_setup":
            while not os.path.exists(signal_file):  # rank 0 is past the default group's setup
                time.sleep(0.01)
            os._exit(3)
        ep_group(timeout_s=timeout_s)
        if mode == "dies":
            os._exit(3)
        time.sleep(10 * timeout_s)  # hangs
        return
    t0 = time.monotonic()
    open(signal_file, "w").close()
    try:
        group = ep_group(timeout_s=timeout_s)
        wg, wd = make_weights(2 * world, 16, 16, torch.float32, False)
        x, ids = torch.randn(8, 16), torch.randint(0, 2 * world, (8, 1))
        ep_moe(x, ids, torch.ones(8, 1), shard_experts(wg, group), shard_experts(wd, group), group=group)
    except hare.DistributedError as e:
        queue.put((rank, f"DistributedError after {time.monotonic() - t0:.1f}s: {e}"))
        queue.close()
        queue.join_thread()  # flush the report, then leave without the collective teardown of a broken group
        os._exit(0)
    raise AssertionError("ep_moe returned although a peer was gone")


def bench_tiny(rank, world, queue):
    from hare.bench.ep import bench_rank

    records = bench_rank(shapes={"tiny": (32, 48, 4, 2)}, tokens=(0, 9), iters=2, dtype=torch.float32,
                         densities=(1.0, 0.25))
    assert [(r["density"], r["tokens"]) for r in records] == [(1.0, 0), (1.0, 9), (0.25, 0), (0.25, 9)]
    for r in records:
        assert r["world"] == world and r["case"] == f"tiny/ep{world}"
        phases = r["dispatch_ms"] + r["experts_ms"] + r["combine_ms"]
        assert r["dispatch_ms"] > 0 and r["combine_ms"] > 0 and r["baseline_ms"] > 0
        assert (r["dispatch_bytes"] > 0) == (r["combine_bytes"] > 0) == (r["tokens"] > 0)
        assert r["dispatch_gbps"] == r["dispatch_bytes"] / r["dispatch_ms"] / 1e6
        assert abs(phases - r["ours_ms"]) <= 1e-6 * max(1.0, phases) or r["ours_ms"] >= max(
            r["dispatch_ms"], r["experts_ms"], r["combine_ms"])


def patched_model_equals_single_process(rank, world, queue):
    from hare.models import patch
    from hare.models.configs import tiny_model

    ids = torch.randint(4, 96, (1 + rank, 7 + 3 * rank), generator=torch.Generator().manual_seed(rank))
    # GPT-OSS: expert biases (sharded with the experts) and its clamped SwiGLU; Llama-4: its rewritten MoE block
    for arch, overrides, experts in (("qwen3_moe", dict(num_experts=8), 8), ("gpt_oss", {}, 4), ("llama4_text", {}, 4)):
        for bn, bm in ((None, None), (1, 2)):
            reference = patch(tiny_model(arch, **overrides), bn=bn, bm=bm)
            sharded = patch(tiny_model(arch, **overrides), bn=bn, bm=bm, ep_group=dist.group.WORLD)
            with torch.no_grad():
                err = rel_error(sharded(ids).logits, reference(ids).logits)
            assert err < 1e-5, f"{arch} bn:bm {bn}:{bm}, rank {rank}: relative logits error {err}"
            shards = [m.num_experts for m in sharded.modules() if type(m).__name__ == "HareExperts"]
            assert shards and all(n == experts // world for n in shards)
