"""Where one MoE layer's time goes: each kernel's device time in a replayed CUDA graph (torch.profiler / CUPTI).

For each case (model shape, tokens, density) one ``hare.gpu.fused_moe`` call is captured as a graph and replayed
under the profiler, L2 flushed before each replay; the table gives every kernel's mean duration, the span from the
first kernel's start to the last one's end (what the layer occupies the GPU) and the replay time by CUDA events
(what the peer benchmark measures). GPU only.

    python scripts/profile_layer.py [--shapes qwen3-30b-a3b ...] [--tokens 1 16 128] [--densities 1 0.25 0.05]
                                    [--fused-decode auto off] [--out profile.json]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

import hare.gpu as hg
from hare.bench.common import write_results
from hare.bench.shapes import MODEL_SHAPES
from hare.bench.toolkit import Timer, make_case, make_weights, sparsify_experts

RATIOS = {1.0: None, 0.5: (1, 1), 0.25: (1, 2), 0.1: (1, 5), 0.05: (1, 10)}
REPS = 20


def profile_case(replay, flush, reps=REPS):
    """Kernel durations (us, mean over reps) and the mean first-start-to-last-end span of one replay."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            torch.cuda.synchronize()
            replay()
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA" and e.name.startswith("hare_")]
    events.sort(key=lambda e: e.time_range.start)
    per = len(events) // reps
    kernels: dict[str, list[float]] = {}
    spans = []
    for r in range(reps):
        chunk = events[r * per:(r + 1) * per]
        for e in chunk:
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
        spans.append(chunk[-1].time_range.end - chunk[0].time_range.start)
    return {k: statistics.mean(v) for k, v in kernels.items()}, statistics.mean(spans)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 16, 128])
    ap.add_argument("--densities", nargs="*", type=float, default=[1.0, 0.25, 0.05])
    ap.add_argument("--fused-decode", nargs="*", default=["auto"], choices=["auto", "off", "on"],
                    help="LaunchConfig.fused_decode of each run (auto: the plan's choice)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    timer = Timer(dev)
    records = []
    for shape in args.shapes:
        H, F, E, k = MODEL_SHAPES[shape]
        dense = make_weights(E, H, F, dev, gen)
        for density in args.densities:
            ratio = RATIOS[density]
            wgu, wd = dense if ratio is None else [sparsify_experts(m, *ratio, bw=16) for m in dense]
            for T, fused in itertools.product(args.tokens, args.fused_decode):
                config = hg.LaunchConfig(fused_decode={"auto": None, "off": False, "on": True}[fused])
                x, ids, w = make_case(T, H, E, k, "uniform", dev, gen)
                hg.fused_moe(x, ids, w, wgu, wd, config=config)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    hg.fused_moe(x, ids, w, wgu, wd, config=config)
                replay_us = timer.time_replay(graph.replay) * 1e3
                kernels, span = profile_case(graph.replay, timer.flush)
                records.append({"shape": shape, "tokens": T, "density": density, "fused_decode": fused,
                                "replay_us": replay_us,
                                "span_us": span, "kernel_sum_us": sum(kernels.values()), "kernels_us": kernels})
                print(f"{shape:18s} T={T:4d} d={density:4.2f} {fused:4s} replay {replay_us:7.1f} span {span:7.1f} "
                      f"kernels {sum(kernels.values()):7.1f} | "
                      + " ".join(f"{n.removeprefix('hare_')} {t:.1f}" for n, t in kernels.items()), flush=True)
    write_results(dev, {"cases": len(records)}, records, args.out, bench="profile_layer")


if __name__ == "__main__":
    main()
