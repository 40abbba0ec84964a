"""Where one MoE layer's time goes: each kernel's device time in a replayed CUDA graph (torch.profiler / CUPTI).

For each case (model shape, tokens, density) one ``hare.gpu.fused_moe`` call is captured as a graph and replayed
under the profiler, L2 flushed before each replay; the table gives every kernel's mean duration, the span from the
first kernel's start to the last one's end (what the layer occupies the GPU) and the replay time by CUDA events
(what the peer benchmark measures). GPU only.

    python scripts/profile_layer.py [--shapes qwen3-30b-a3b ...] [--tokens 1 16 128] [--densities 1 0.25 0.05]
                                    [--fused-decode auto off] [--timeline] [--out profile.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

import hare.gpu as hg
from hare.bench.common import results, save_progress
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


def timeline(run, flush, dev, reps=5):
    """The fused decode kernel's own marks (csrc/decode.cuh TraceMark) of one call, L2 flushed first: the span of
    its tiles and, per phase, the mean of each step (us), from the median of `reps` calls. None when the call
    runs the unfused kernels."""
    size = 1 << 16
    buf = torch.zeros(size, 4, dtype=torch.int64, device=dev)

    def trace(tiles):
        assert tiles <= size
        return buf.data_ptr()

    hg._programs.clear()
    hg.decode_trace = trace
    try:
        runs = []
        for _ in range(reps):
            buf.zero_()
            flush.zero_()
            torch.cuda.synchronize()
            run()
            torch.cuda.synchronize()
            marks = buf[(buf[:, 0] != 0)].cpu()
            if len(marks) == 0:
                return None
            t0 = marks[:, 0].min()
            m = (marks - t0).double() / 1e3
            gu, dn = m[marks[:, 3] == 0], m[marks[:, 3] != 0]
            mean = lambda v: float(v.mean()) if len(v) else 0.0  # noqa: E731
            runs.append({
                "span_us": float(m[:, 2].max()), "gate_up_tiles": len(gu), "down_tiles": len(dn),
                "gate_up_end_us": float(gu[:, 2].max()) if len(gu) else 0.0,
                "gate_up_mma_us": mean(gu[:, 1] - gu[:, 0]), "gate_up_epilogue_us": mean(gu[:, 2] - gu[:, 1]),
                "down_first_start_us": float(dn[:, 0].min()) if len(dn) else 0.0,
                "down_wait_us": mean((dn[:, 3] - dn[:, 0]).clamp(min=0)),
                "down_mma_us": mean(dn[:, 1] - torch.maximum(dn[:, 0], dn[:, 3])),
                "down_epilogue_us": mean(dn[:, 2] - dn[:, 1]),
            })
        runs.sort(key=lambda r: r["span_us"])
        return runs[len(runs) // 2]
    finally:
        hg.decode_trace = None
        hg._programs.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 16, 128])
    ap.add_argument("--densities", nargs="*", type=float, default=[1.0, 0.25, 0.05])
    ap.add_argument("--fused-decode", nargs="*", default=["auto"], choices=["auto", "off", "on"],
                    help="LaunchConfig.fused_decode of each run (auto: the plan's choice)")
    ap.add_argument("--gemv", nargs="*", default=["auto"], choices=["auto", "off", "on"],
                    help="LaunchConfig.gemv of each run (auto: the plan's choice)")
    ap.add_argument("--timeline", action="store_true", help="also the fused decode kernel's per-tile marks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    timer = Timer(dev)
    result = results(dev, {}, [], bench="profile_layer", wall_s=0.0)  # saved after each case (save_progress)
    records, t_start = result["records"], time.perf_counter()
    for shape in args.shapes:
        H, F, E, k = MODEL_SHAPES[shape]
        dense = make_weights(E, H, F, dev, gen)
        for density in args.densities:
            ratio = RATIOS[density]
            wgu, wd = dense if ratio is None else [sparsify_experts(m, *ratio, bw=16) for m in dense]
            for T, fused, gemv in itertools.product(args.tokens, args.fused_decode, args.gemv):
                choice = {"auto": None, "off": False, "on": True}
                config = hg.LaunchConfig(fused_decode=choice[fused], gemv=choice[gemv])
                x, ids, w = make_case(T, H, E, k, "uniform", dev, gen)
                hg.fused_moe(x, ids, w, wgu, wd, config=config)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    hg.fused_moe(x, ids, w, wgu, wd, config=config)
                replay_us = timer.time_replay(graph.replay) * 1e3
                kernels, span = profile_case(graph.replay, timer.flush)
                marks = timeline(lambda: hg.fused_moe(x, ids, w, wgu, wd, config=config), timer.flush, dev) \
                    if args.timeline else None
                records.append({"shape": shape, "tokens": T, "density": density, "fused_decode": fused, "gemv": gemv,
                                "replay_us": replay_us,
                                "span_us": span, "kernel_sum_us": sum(kernels.values()), "kernels_us": kernels,
                                "timeline": marks})
                print(f"{shape:18s} T={T:4d} d={density:4.2f} {fused:4s} {gemv:4s} replay {replay_us:7.1f} span {span:7.1f} "
                      f"kernels {sum(kernels.values()):7.1f} | "
                      + " ".join(f"{n.removeprefix('hare_')} {t:.1f}" for n, t in kernels.items()), flush=True)
                if marks:
                    print("    timeline " + " ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in marks.items()))
                save_progress(result, {"cases": len(records)}, t_start, args.out)
    print(json.dumps({"cases": len(records)}))


if __name__ == "__main__":
    main()
