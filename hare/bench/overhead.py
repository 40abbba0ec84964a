"""``hare bench overhead``: what an eager ``hare.moe`` call costs the host, beside the same call as a CUDA graph.

Issue 13's decode case: Qwen3-30B-A3B's expert sizes (hidden 2048, ffn 768) with 32 experts, top-4, at 1, 16,
64 and 128 tokens, dense and at 25% density (Block N:M 1:2, bw 16), each with ``check_ids`` on and off. Per case:

* ``host_us``   the Python call alone, issued on an idle GPU (a sync before it, outside the clock), median over
                calls: the host's own cost;
* ``batch_us``  the mean per call over a batch of calls without a sync (a sync between batches, outside the clock),
                median over batches: where the GPU is slower than the host, the launch queue's back-pressure shows;
* ``wall_us``   the call followed by ``torch.cuda.synchronize()``, mean per call;
* ``graph_us``  one call captured as a CUDA graph and replayed (``toolkit.Timer``: CUDA events, L2 flushed).

The summary has the worst host time per ``check_ids`` and the most the id check adds (host and wall), against the
issue's targets (40 us per eager call, 10 us for the check). Results go to ``bench/results/overhead_<gpu>.json``
through ``common.write_results``. On the CPU (no graphs; the reference path) it runs as a plumbing check.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..blocknm import DENSITIES as RATIOS
from ..moe import moe
from .common import gpu_slug, write_results
from .shapes import MODEL_SHAPES
from .toolkit import Timer, make_case, make_weights, sparsify_experts

SHAPES = {"qwen3-30b-a3b-e32k4": (*MODEL_SHAPES["qwen3-30b-a3b"][:2], 32, 4)}  # the case
TOKENS = (1, 16, 64, 128)
DENSITIES = (1.0, 0.25)
TARGET_HOST_US, TARGET_CHECK_US = 40.0, 10.0


def host_us(fn, sync, batches: int = 30, per: int = 20) -> float:
    """Host time of one ``fn()`` in us: median over `batches` of the mean over `per` calls, synced between batches
    (per=1: each call on an idle GPU)."""
    fn()
    sync()
    times = []
    for _ in range(batches):
        sync()
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        times.append((time.perf_counter() - t0) / per)
    sync()
    times.sort()
    return times[len(times) // 2] * 1e6


def wall_us(fn, sync, calls: int = 200) -> float:
    """Mean us of ``fn()`` followed by ``sync()``."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        sync()
    return (time.perf_counter() - t0) / calls * 1e6


def weights_at(dense, density: float):
    """The dense experts, or both projections as Block N:M at `density` (bw 16; a gate/up whose ffn is no multiple
    of 128 in the halves layout, as hare.patch makes it)."""
    if density == 1.0:
        return dense
    bn, bm = RATIOS[density]
    wgu, wd = dense
    return (sparsify_experts(wgu, bn, bm, 16, halves=wgu.shape[1] // 2 % 128 != 0),
            sparsify_experts(wd, bn, bm, 16))


def run(shapes=None, tokens=TOKENS, densities=DENSITIES, out_json=None, device="cuda", seed=0, batches: int = 30,
        per: int = 20, calls: int = 200) -> dict:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = Timer(dev) if cuda else None
    gen = torch.Generator(device=dev).manual_seed(seed)
    records = []
    for shape in shapes or SHAPES:
        H, F, E, k = SHAPES[shape] if isinstance(shape, str) else shape
        name = shape if isinstance(shape, str) else f"H{H}-F{F}-E{E}-k{k}"
        dense = make_weights(E, H, F, dev, gen)
        for density in densities:
            wgu, wd = weights_at(dense, density)
            for T in tokens:
                x, ids, w = make_case(T, H, E, k, "uniform", dev, gen)
                w = w.to(torch.bfloat16)  # as a bf16 model's router gives them
                outs = {}
                for check in (False, True):
                    fn = lambda: moe(x, ids, w, wgu, wd, check_ids=check)  # noqa: E731
                    outs[check] = fn()
                    rec = {"bench": "overhead", "case": f"{name}/T{T}/d{density:g}/check{int(check)}", "shape": name,
                           "hidden": H, "ffn": F, "experts": E, "top_k": k, "tokens": T, "density": density,
                           "check_ids": check, "host_us": host_us(fn, sync, batches * per, 1),
                           "batch_us": host_us(fn, sync, batches, per),
                           "wall_us": wall_us(fn, sync, calls) if cuda else None,
                           "graph_us": timer.time_graph(fn) * 1e3 if cuda else None}
                    records.append(rec)
                    print(f"{name:20s} T={T:<4d} density {density:<5g} check_ids={int(check)}  host "
                          f"{rec['host_us']:7.1f} us  batch {rec['batch_us']:7.1f} us  wall "
                          f"{rec['wall_us'] or 0:7.1f} us  graph {rec['graph_us'] or 0:7.1f} us", flush=True)
                if not torch.equal(outs[True], outs[False]):
                    raise RuntimeError(f"{name} T={T} density {density}: check_ids changed the output")
    return write_results(dev, summary(records), records, out_json,
                         targets={"host_us": TARGET_HOST_US, "check_us": TARGET_CHECK_US})


def summary(records: list[dict]) -> dict:
    """Worst host time per check_ids, the most the id check adds (host, and wall where timed), and the targets."""
    out = {}
    for check in (False, True):
        out[f"max_host_us_check{int(check)}"] = max(r["host_us"] for r in records if r["check_ids"] == check)
    pairs = {}
    for r in records:
        pairs.setdefault(r["case"].rsplit("/", 1)[0], {})[r["check_ids"]] = r
    for key in ("host_us", "wall_us"):
        diffs = [p[True][key] - p[False][key] for p in pairs.values() if p[True][key] is not None]
        if diffs:
            out[f"max_check_cost_{key}"] = max(diffs)
    out["host_target_met"] = out["max_host_us_check1"] <= TARGET_HOST_US
    out["check_target_met"] = out["max_check_cost_host_us"] <= TARGET_CHECK_US
    return out


def default_out_json(device="cuda") -> Path:
    """``bench/results/overhead_<gpu>.json``, the GPU named as the other suites name it (e.g. h200)."""
    return Path("bench/results") / f"overhead_{gpu_slug(torch.cuda.get_device_name(device))}.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES), choices=[1.0, *RATIOS])
    parser.add_argument("--out-json", default=None, help="default: bench/results/overhead_<gpu>.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    run(args.shapes, args.tokens, args.densities, args.out_json or default_out_json())


if __name__ == "__main__":
    main()
