"""``python -m hare.bench.launch``: what programmatic dependent launch (PDL, ``hare.gpu.LaunchConfig``) saves.

A decode-sized MoE call is a chain of 4-6 short kernels (layout, gate/up, its split-K combine, down, the top-k
combine), so the gaps between them are a visible part of its time. Each case captures one ``hare.gpu.fused_moe``
call as a CUDA graph twice, with plain launches and with PDL (``config=LaunchConfig(programmatic_launch=...)``),
and times the replays (L2 flushed) alternately, twice each, keeping the faster of each pair; both graphs must give
bitwise the same output. Cases: the six model shapes at 1, 8 and 128
tokens, dense and at 25% and 5% density.
"""

from __future__ import annotations

import argparse
import math

import torch

from .common import geomean, write_results
from .shapes import MODEL_SHAPES
from .toolkit import Timer, make_case, make_weights, sparsify_experts

TOKENS = (1, 8, 128)
DENSITIES = {1.0: None, 0.25: (1, 2), 0.05: (1, 10)}


def _graph_output(fn):
    """fn() captured as a CUDA graph; returns (replay, output tensor rewritten by each replay)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def run(shapes=None, tokens=TOKENS, out_json=None, device="cuda", seed=0) -> dict:
    import hare.gpu as hg

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    timer = Timer(dev)
    records = []
    for shape in shapes or MODEL_SHAPES:
        H, F, E, k = MODEL_SHAPES[shape]
        dense = make_weights(E, H, F, dev, gen)
        for density, ratio in DENSITIES.items():
            wgu, wd = dense if ratio is None else [sparsify_experts(m, *ratio, bw=16) for m in dense]
            for T in tokens:
                x, ids, w = make_case(T, H, E, k, "uniform", dev, gen)
                w = w.to(torch.bfloat16)  # as a bf16 model's router gives them
                ms, outs = {}, {}
                for pdl in (False, True, False, True):
                    config = hg.LaunchConfig(programmatic_launch=pdl)
                    replay, out = _graph_output(lambda: hg.fused_moe(x, ids, w, wgu, wd, config=config))
                    out.fill_(float("nan"))
                    t = timer.time_replay(replay)
                    ms[pdl] = min(ms.get(pdl, math.inf), t)
                    outs[pdl] = out.clone()
                if not torch.equal(outs[True], outs[False]):
                    raise RuntimeError(f"{shape} T={T} density {density}: PDL changed the output")
                records.append({"bench": "launch", "case": f"{shape}/T{T}/d{density:g}", "shape": shape,
                                "tokens": T, "density": density, "plain_ms": ms[False], "pdl_ms": ms[True],
                                "speedup": ms[False] / ms[True]})
                print(f"{shape:18s} T={T:<4d} density {density:<5g} plain {ms[False] * 1e3:8.1f} us   "
                      f"PDL {ms[True] * 1e3:8.1f} us   {ms[False] / ms[True]:.3f}x", flush=True)
    summary = {f"geomean_speedup_T{T}": geomean(r["speedup"] for r in records if r["tokens"] == T) for T in tokens}
    return write_results(dev, summary, records, out_json)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(MODEL_SHAPES), default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    run(args.shapes, args.tokens, args.out_json)


if __name__ == "__main__":
    main()
