"""`hare bench ep`: time of one expert-parallel MoE step, split into dispatch, local experts and combine.

Run under torchrun, one process per GPU (`hare bench ep --gpus N` starts it): every rank routes its own tokens
over all experts (uniform top-k), the experts sharded evenly, dense (density 1.0) or pruned to Block N:M (bw 16,
the density's ratio in ``hare.blocknm.DENSITIES``). Per phase the slowest rank's median time is reported; the
baseline is the same tokens through ``hare.moe`` with all experts (same density) on one GPU (one rank's share).
The all-to-all traffic is all ranks' bytes to other ranks per step (``dispatch_bytes``, ``combine_bytes``; a rank's
rows for itself stay local), and ``*_gbps`` those bytes over the slowest rank's phase time.
Records follow the kernel benchmarks' schema with ``"bench": "ep"``; rank 0 writes the JSON (on GPUs by default
to ``bench/results/ep_<gpu>x<world>.json``) with the backend and world size beside the usual run info.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..blocknm import DENSITIES, sparsify
from ..distributed import combine, dispatch, run_local_experts, shard_experts
from ..errors import InvalidArgumentError
from ..moe import moe
from .common import geomean, gpu_slug, write_results
from .shapes import MODEL_SHAPES

SHAPES = {**MODEL_SHAPES, "small": (256, 512, 8, 2)}  # small: the demo's layer, for a smoke run (e.g. --cpu)
DEFAULT_SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite")
TOKENS = (1, 128, 4096)
DEFAULT_DENSITIES = (1.0, 0.25)  # 1.0: dense; others from DENSITIES (0.25: Block 1:2)
BW = 16


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _step_phases(x, ids, w, gu, dn, group) -> tuple[float, float, float, int, int]:
    """One step's dispatch, local experts and combine times (ms) and the bytes this rank sent to its peers in the
    dispatch and in the combine."""
    dev = x.device
    t0 = _now(dev)
    d = dispatch(x, ids, w, gu, dn, group)
    t1 = _now(dev)
    partials = run_local_experts(d, gu, dn)
    t2 = _now(dev)
    combine(partials, d, group)
    t3 = _now(dev)
    return ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, *d.peer_bytes())


def _weights(w: torch.Tensor, density: float, dtype: torch.dtype):
    """The stacked expert weight ``w`` as benchmarked at ``density``: itself, or pruned to Block N:M (bw 16)."""
    if density == 1.0:
        return w
    bn, bm = DENSITIES[density]
    return sparsify(w, bn=bn, bm=bm, bw=BW, dtype=dtype)


def _time_step(x, ids, w, full, shard, iters: int, group) -> tuple[list[float], int, int]:
    """The slowest rank's median dispatch, local experts, combine and step times and its median time of the same
    tokens through all experts (``full``) in one process (ms), and all ranks' bytes to their peers in the dispatch
    and in the combine."""
    device = x.device
    phases = []
    for i in range(iters + 2):
        dist.barrier(group)
        if i >= 2:  # two warm-up steps
            phases.append(_step_phases(x, ids, w, *shard, group))
    single = []
    for i in range(iters + 2):
        t0 = _now(device)
        moe(x, ids, w, *full)
        if i >= 2:
            single.append((_now(device) - t0) * 1e3)
    med = [statistics.median(p[j] for p in phases) for j in range(3)]
    local = torch.tensor([*med, sum(med), statistics.median(single), *phases[-1][3:]], dtype=torch.float64)
    world = dist.get_world_size(group)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.to(device) if device.type == "cuda" else local, group=group)
    ranks = torch.stack([t.cpu() for t in gathered])
    sent, returned = ranks[:, 5:].sum(0).tolist()
    return ranks[:, :5].amax(0).tolist(), int(sent), int(returned)


def bench_rank(shapes=None, tokens=TOKENS, iters: int = 10, device=None, dtype=torch.bfloat16,
               group=None, densities=DEFAULT_DENSITIES) -> list[dict]:
    """Run on every rank of an initialised process group; returns the records (identical on all ranks)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device(device or "cpu")
    shapes = shapes or {n: SHAPES[n] for n in DEFAULT_SHAPES}
    records = []
    for name, (hidden, ffn, experts, top_k) in shapes.items():
        if experts % world:
            continue
        g = torch.Generator().manual_seed(0)
        dense_gu = (torch.randn(experts, 2 * ffn, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
        dense_dn = (torch.randn(experts, hidden, ffn, generator=g) / ffn ** 0.5).to(device, dtype)
        for density in densities:
            # the masks are per expert, so each rank's shard of the pruned weight is its dense shard pruned
            w_gu, w_dn = _weights(dense_gu, density, dtype), _weights(dense_dn, density, dtype)
            gu, dn = shard_experts(w_gu, group), shard_experts(w_dn, group)
            for t in tokens:
                gr = torch.Generator().manual_seed(1 + rank)
                x = torch.randn(t, hidden, generator=gr).to(device, dtype)
                ids = torch.rand(t, experts, generator=gr).topk(top_k, dim=1).indices.to(device)
                w = torch.rand(t, top_k, generator=gr).to(device, dtype)
                worst, sent, returned = _time_step(x, ids, w, (w_gu, w_dn), (gu, dn), iters, group)
                records.append({"bench": "ep", "case": f"{name}/ep{world}", "tokens": t, "density": density,
                                "ours_ms": worst[3], "baseline": "single_gpu_all_experts", "baseline_ms": worst[4],
                                "dispatch_ms": worst[0], "experts_ms": worst[1], "combine_ms": worst[2],
                                "dispatch_bytes": sent, "combine_bytes": returned,
                                "dispatch_gbps": sent / worst[0] / 1e6, "combine_gbps": returned / worst[2] / 1e6,
                                "world": world, "tokens_per_rank": t})
            del w_gu, w_dn, gu, dn
        del dense_gu, dense_dn
    return records


def _print(records: list[dict]) -> None:
    """Times in ms (the slowest rank's median); 'all experts' is one process running every expert on its tokens;
    KiB are all ranks' bytes to other ranks per step."""
    print(f"{'case':<28}{'density':>8}{'tok/rank':>9}{'dispatch ms':>13}{'experts ms':>13}{'combine ms':>13}"
          f"{'step ms':>13}{'all experts ms':>16}{'dispatch KiB':>14}{'combine KiB':>13}")
    for r in records:
        print(f"{r['case']:<28}{r['density']:>8}{r['tokens']:>9}{r['dispatch_ms']:>13.3f}{r['experts_ms']:>13.3f}"
              f"{r['combine_ms']:>13.3f}{r['ours_ms']:>13.3f}{r['baseline_ms']:>16.3f}"
              f"{r['dispatch_bytes'] / 1024:>14.1f}{r['combine_bytes'] / 1024:>13.1f}")


def parse_options(shapes: str | None = None, tokens: str | None = None,
                  densities: str | None = None) -> tuple[dict, list[int], list[float]]:
    """The ``--shapes``, ``--tokens`` and ``--densities`` texts (comma-separated; None: the defaults) as
    {name: shape}, token counts and densities; refused before any process starts."""
    shapes = ",".join(DEFAULT_SHAPES) if shapes is None else shapes
    tokens = ",".join(map(str, TOKENS)) if tokens is None else tokens
    densities = ",".join(map(str, DEFAULT_DENSITIES)) if densities is None else densities
    names = [n.strip() for n in shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if not names or unknown:
        raise InvalidArgumentError(f"shapes: unknown {unknown or shapes!r}; choose from {', '.join(sorted(SHAPES))}")
    try:
        counts = [int(t) for t in tokens.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise InvalidArgumentError(f"tokens: {tokens!r} is not a comma-separated list of token counts >= 0")
    allowed = sorted({1.0, *DENSITIES}, reverse=True)
    try:
        values = [float(d) for d in densities.split(",")]
    except ValueError:
        values = []
    if not values or set(values) - set(allowed) or len(set(values)) < len(values):
        raise InvalidArgumentError(f"densities: {densities!r}; expected distinct values, comma-separated, from "
                                   f"{allowed} (1.0: dense)")
    return {n: SHAPES[n] for n in names}, counts, values


def default_out_json(gpu: str, world: int) -> Path:
    """``bench/results/ep_<gpu>x<world>.json``, the GPU named as the other suites name it (e.g. h200)."""
    return Path("bench/results") / f"ep_{gpu_slug(gpu)}x{world}.json"


def main(argv=None) -> None:
    """Entry point of each torchrun process."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-json", type=Path, default=None,
                        help="default on GPUs: bench/results/ep_<gpu>x<world>.json; on the CPU: none")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tokens", type=str, default=None, help=f"comma-separated (default {TOKENS})")
    parser.add_argument("--shapes", type=str, default=None, help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--densities", type=str, default=None,
                        help=f"comma-separated, 1.0 (dense) or from {sorted(DENSITIES)} (default {DEFAULT_DENSITIES})")
    args = parser.parse_args(argv)
    shapes, tokens, densities = parse_options(args.shapes, args.tokens, args.densities)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    try:
        device = "cuda" if cuda else "cpu"
        records = bench_rank(shapes=shapes, tokens=tokens, iters=args.iters, device=device, densities=densities)
        if dist.get_rank() == 0:
            _print(records)
            world = dist.get_world_size()
            out_json = args.out_json or (default_out_json(torch.cuda.get_device_name(), world) if cuda else None)
            summary = {"step_vs_all_experts_geomean": {
                           str(d): geomean(r["baseline_ms"] / r["ours_ms"] for r in records if r["density"] == d)
                           for d in densities if any(r["density"] == d for r in records)},
                       "dispatch_bytes": sum(r["dispatch_bytes"] for r in records),
                       "combine_bytes": sum(r["combine_bytes"] for r in records)}
            write_results(device, summary, records, out_json, backend=dist.get_backend(), world=world)
            if out_json:
                print(f"{len(records)} records -> {out_json}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
