"""Sweep the launch plan's free choices (hare.gpu.LaunchConfig: tile width, K splits, tile order) on the peer
benchmark's model shapes and report, per case, the default plan's time beside the best override's. This is how
the plan's heuristics (hare/gpu/plan.py: choose_block_n, best_splits, DEFAULT_RASTER) are checked against
measurement after a kernel change; it is a tuning tool, not a result (the peer benchmark is).

  python scripts/tune_plan.py [--shapes ...] [--tokens ...] [--densities 0 0.25 ...] [--out tune.json]

Density 0 is dense; sparse weights are hare.sparsify'd with the joint panels hare.patch uses by default, a few
experts at a time and repeated to E (the kernels' speed does not depend on the values). Timing: CUDA-graph
replays with L2 flushed (hare.bench.toolkit.Timer), median; the default plan is timed first and again last
(``default_drift``), since clocks sag over a long sweep of one heavy case. Gains below the drift, or ~5% (the
run-to-run spread), are noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from hare.bench.common import run_info
from hare.bench.shapes import MODEL_SHAPES
from hare.bench.toolkit import Timer, make_case, make_weights
from hare.blocknm import DENSITIES, BlockNM, expert_layout, sparsify
from hare.gpu import LaunchConfig, fused_moe
from hare.gpu.plan import TILE_NS

SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b")
RASTERS = (4, 8, 16, -2, -4)
SPLITS = (1, 2, 4, 8)
SPLIT_MAX_TOKENS = 128  # K splits are swept only at decode sizes, where the plan splits


def repeated_blocknm(w: torch.Tensor, density: float, bw: int, part_name: str, experts: int) -> BlockNM:
    """w's experts pruned as hare.patch prunes them (joint panels where they fit), repeated to `experts`."""
    bn, bm = DENSITIES[density]
    part = sparsify(w, bn=bn, bm=bm, bw=bw, **expert_layout(part_name, w.shape[-2], True))
    reps = -(-experts // w.shape[0])
    cat = lambda t: torch.cat([t] * reps)[:experts].contiguous()  # noqa: E731
    return BlockNM(cat(part.values), cat(part.meta), cat(part.block_idx), shape=(experts, *w.shape[1:]),
                   **part.params)


def configs(tokens: int):
    yield "default", LaunchConfig()
    for n in TILE_NS:
        yield f"tile_n={n}", LaunchConfig(tile_n=n)
    for r in RASTERS:
        yield f"raster={r}", LaunchConfig(raster=r)
    if tokens <= SPLIT_MAX_TOKENS:
        for g, d in itertools.product(SPLITS, SPLITS):
            yield f"splits={g},{d}", LaunchConfig(gateup_splits=g, down_splits=d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(MODEL_SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 512, 2048, 8192])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.0, 0.25, 0.1])
    ap.add_argument("--bw", type=int, default=16)
    ap.add_argument("--only-default", action="store_true", help="time the default plan only")
    ap.add_argument("--out", default="tune_plan.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    timer = Timer(dev)
    records, t0 = [], time.time()
    for shape in args.shapes:
        H, F, E, k = MODEL_SHAPES[shape][:4]
        wgu, wd = make_weights(min(E, 4), H, F, dev, gen)
        full = make_weights(E, H, F, dev, gen) if 0.0 in args.densities else None
        for density in args.densities:
            if density == 0.0:
                weights = full
            else:
                weights = (repeated_blocknm(wgu, density, args.bw, "gate_up", E),
                           repeated_blocknm(wd, density, args.bw, "down", E))
            for T in args.tokens:
                x, ids, w = make_case(T, H, E, k, "uniform", dev, gen)
                times = {}
                for name, cfg in [("default", LaunchConfig())] if args.only_default else configs(T):
                    try:
                        times[name] = timer.time_graph(lambda: fused_moe(x, ids, w, *weights, config=cfg))
                    except Exception as e:  # an override the plan refuses for this case
                        times[name] = None
                        print(f"  {shape} T={T} d={density} {name}: {type(e).__name__}: {e}")
                # the default again, last: clocks sag under a long sweep of one heavy case, so a drift > 1 says
                # how much of a late override's loss (or a gain below it) is the sweep, not the override
                drift = timer.time_graph(lambda: fused_moe(x, ids, w, *weights)) / times["default"] \
                    if len(times) > 1 else 1.0
                ok = {n: t for n, t in times.items() if t is not None}
                best = min(ok, key=ok.get)
                records.append(dict(shape=shape, tokens=T, density=density, times_ms=times, best=best,
                                    default_ms=times["default"], best_ms=ok[best],
                                    gain=times["default"] / ok[best], default_drift=drift))
                save(args.out, dev, args, records)  # as it goes, so a run cut short keeps what it timed
                print(f"{shape:18s} T={T:5d} d={density:4.2f} default {times['default']:.4f} ms, best {best} "
                      f"{ok[best]:.4f} ms ({times['default'] / ok[best]:.3f}x), drift {drift:.3f}  [{time.time() - t0:.0f} s]",
                      flush=True)
        del full, weights
        torch.cuda.empty_cache()


def save(path, dev, args, records):
    with open(path, "w") as f:
        json.dump(dict(bench="tune_plan", **run_info(dev), args=vars(args), records=records), f, indent=1)


if __name__ == "__main__":
    main()
