"""`hare bench kernels`: the fused MoE kernels of hare.gpu against torch baselines on the same routing.

Shapes: six MoE models (hidden -> ffn, experts, top-k); tokens 1..16384; uniform and Zipf-skewed routing.
Methods, all timed as CUDA-graph replays (median of several, L2 flushed before each replay, CUDA events):

* ours        hare.gpu.fused_moe (layout build + gate/up + down + combine), deterministic mode (the default)
* ours_fast   the same with deterministic=False (fp32 atomics), an extra key
* layout      hare.gpu.build_layout alone (block 128), 20 builds per graph replay, time / 20
* grouped_mm, cublas_loop, padded: the baselines of hare.bench.baselines

Reports time, speedup, TFLOP/s and bytes/s (touched experts' weights + x + out) and their fractions of the
matrix peak and copy bandwidth measured in the same run; writes JSON records and a PNG plot; prints a table.
With ``--density`` (Block N:M weights) or ``--suite real synthetic`` (the Hare paper's settings) it runs the sparse
benchmark of hare.bench.sparse instead, with the same timer, ceilings, inputs and baselines; with ``--suite gpt-oss``
the GPT-OSS-20B layer of hare.bench.gpt_oss (expert biases, clamped SwiGLU; dense and Block N:M through hare.moe).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import gpt_oss, sparse
from .baselines import cublas_loop_fn, grouped_mm_fn, padded_fn
from .common import geomean, pyplot, write_results
from .shapes import MODEL_SHAPES
from .toolkit import ROUTINGS, BenchSession, make_case, make_weights, moe_flops, traffic_bytes
from ..metrics import relative_error

TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
BASELINES = ("grouped_mm", "cublas_loop", "padded")


def run_kernel_bench(shapes=None, tokens=None, routing=None, out_json=None, plot_dir=None, baselines=True,
                     log=None, device="cuda", seed=0, print_table=True) -> dict:
    """Run the benchmark; returns the JSON dict (also written to ``out_json`` when given)."""
    import hare.gpu as hg

    session = BenchSession(device, seed, log)
    dev, gen, say, ceil, timer = session.dev, session.gen, session.say, session.ceil, session.timer
    shapes = list(shapes or MODEL_SHAPES)
    tokens = list(tokens or TOKENS)
    routings = list(routing or ROUTINGS) if not isinstance(routing, str) else [routing]
    records = []
    t_start = time.perf_counter()
    for shape in shapes:
        H, F, E, k = MODEL_SHAPES[shape]
        wgu, wd = make_weights(E, H, F, dev, gen)
        wgu_t, wd_t = wgu.transpose(1, 2), wd.transpose(1, 2)
        for rt in routings:
            for T in tokens:
                x, ids, w = make_case(T, H, E, k, rt, dev, gen)
                R = T * k
                counts = torch.bincount(ids.reshape(-1), minlength=E)
                touched = int((counts > 0).sum())
                flops = moe_flops(R, H, F)
                min_bytes = traffic_bytes(3.0 * H * F * 2, touched, T, H)
                rec_base = {"bench": "kernels", "case": f"{shape}/{rt}", "tokens": T, "density": 1.0,
                            "shape": shape, "routing": rt, "hidden": H, "ffn": F, "experts": E, "top_k": k,
                            "touched_experts": touched, "max_rows_per_expert": int(counts.max()),
                            "flops": flops, "min_bytes": min_bytes,
                            "block_n": hg.choose_block_n(R, E)}
                ours = lambda: hg.fused_moe(x, ids, w, wgu, wd)  # noqa: E731
                out = ours()
                t_ours = timer.time_graph(ours)
                t_fast = timer.time_graph(lambda: hg.fused_moe(x, ids, w, wgu, wd, deterministic=False))
                t_layout = timer.time_graph(lambda: [hg.build_layout(ids, E, 128) for _ in range(20)],
                                            budget_s=0.05) / 20
                extra = {"ours_fast_ms": t_fast, "layout_ms": t_layout,
                         "ours_tflops": flops / (t_ours * 1e-3) / 1e12,
                         "ours_tbps": min_bytes / (t_ours * 1e-3) / 1e12}
                extra["frac_matmul_peak"] = extra["ours_tflops"] / ceil["matmul_tflops"]
                extra["frac_copy_bw"] = extra["ours_tbps"] / ceil["copy_tbps"]
                bl = {}
                if baselines:
                    gfn = grouped_mm_fn(x, ids, w, wgu_t, wd_t)
                    ref = gfn()
                    extra["rel_err_vs_grouped_mm"] = relative_error(out, ref)
                    bl["grouped_mm"] = timer.time_graph(gfn)
                    del ref
                    bl["cublas_loop"] = timer.time_graph(cublas_loop_fn(x, ids, w, wgu, wd))
                    bl["padded"] = timer.time_graph(padded_fn(x, ids, w, wgu_t, wd_t))
                else:
                    bl["none"] = float("nan")
                for name, t_b in bl.items():
                    r = dict(rec_base, ours_ms=t_ours, baseline=name, baseline_ms=t_b,
                             speedup=t_b / t_ours if t_b == t_b else None,
                             baseline_tflops=flops / (t_b * 1e-3) / 1e12 if t_b == t_b else None, **extra)
                    records.append(r)
                say(json.dumps({**rec_base, "ours_ms": t_ours, **extra, **{f"{n}_ms": v for n, v in bl.items()}}))
            torch.cuda.empty_cache()
        wgu = wd = wgu_t = wd_t = None  # free this shape's weights before the next one's
        torch.cuda.empty_cache()

    launch = measure_launch_overhead(dev)
    summary = {f"geomean_speedup_vs_{name}": geomean(r["speedup"] for r in records if r["baseline"] == name)
               for name in BASELINES if baselines}
    result = write_results(dev, summary, records, out_json, ceilings=ceil, launch_overhead=launch,
                           wall_s=time.perf_counter() - t_start)
    if plot_dir:
        try:
            plot(result, Path(plot_dir))
        except Exception as exc:  # noqa: BLE001
            print(f"plot failed: {exc}")
    if print_table:
        print(format_table(result))
    session.close()
    return result


def measure_launch_overhead(dev) -> dict:
    """Host time per call of one small hare.gpu.fused_moe call (qwen3-30b-a3b, 1 token), back to back: eager (the
    public function: cheap checks, launch plan, Python and driver launches) and replayed as a CUDA graph."""
    import hare.gpu as hg

    H, F, E, k = MODEL_SHAPES["qwen3-30b-a3b"]
    gen = torch.Generator(device=dev).manual_seed(1)
    wgu, wd = make_weights(E, H, F, dev, gen)
    x, ids, w = make_case(1, H, E, k, "uniform", dev, gen)

    def per_call_us(fn, n: int = 200) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    call = lambda: hg.fused_moe(x, ids, w, wgu, wd)  # noqa: E731
    per_call_us(call, 5)  # warm-up: kernels loaded, plans cached
    eager_us = per_call_us(call)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    g.replay()
    return {"case": "qwen3-30b-a3b T=1", "eager_us": eager_us, "graph_replay_us": per_call_us(g.replay)}


def format_table(result) -> str:
    rows = {}
    for r in result["records"]:
        key = (r["case"], r["tokens"])
        d = rows.setdefault(key, dict(r))
        d[r["baseline"] + "_ms"] = r["baseline_ms"]
    c = result["ceilings"]
    lines = [f"GPU {result['gpu']}  copy {c['copy_tbps']:.2f} TB/s  matmul {c['matmul_tflops']:.0f} TFLOP/s  "
             f"launch {result['launch_overhead']}",
             f"{'case':<28}{'T':>6}{'BN':>4}{'ours':>9}{'fast':>9}{'grp_mm':>9}{'x':>6}{'cublas':>9}{'padded':>9}"
             f"{'TF/s':>7}{'%pk':>5}{'TB/s':>6}{'%bw':>5}{'lay_us':>7}{'err':>8}"]
    for (case, T), d in rows.items():
        g = d.get("grouped_mm_ms", float("nan"))
        lines.append(
            f"{case:<28}{T:>6}{d['block_n']:>4}{d['ours_ms']:>9.4f}{d['ours_fast_ms']:>9.4f}{g:>9.4f}"
            f"{g / d['ours_ms']:>6.2f}{d.get('cublas_loop_ms', float('nan')):>9.4f}"
            f"{d.get('padded_ms', float('nan')):>9.4f}{d['ours_tflops']:>7.0f}{100 * d['frac_matmul_peak']:>5.0f}"
            f"{d['ours_tbps']:>6.2f}{100 * d['frac_copy_bw']:>5.0f}{1000 * d['layout_ms']:>7.1f}"
            f"{d.get('rel_err_vs_grouped_mm', float('nan')):>8.1e}")
    return "\n".join(lines)


def plot(result, plot_dir: Path) -> Path:
    plt = pyplot()

    plot_dir.mkdir(parents=True, exist_ok=True)
    shapes = sorted({r["shape"] for r in result["records"]}, key=list(MODEL_SHAPES).index)
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 7), squeeze=False)
    for i, shape in enumerate(shapes):
        for rt, style in (("uniform", "-"), ("zipf", "--")):
            for base, color in (("grouped_mm", "C0"), ("cublas_loop", "C1"), ("padded", "C2")):
                pts = sorted((r["tokens"], r["speedup"]) for r in result["records"]
                             if r["shape"] == shape and r["routing"] == rt and r["baseline"] == base)
                if pts:
                    axes[0][i].plot(*zip(*pts), style, color=color, marker="o", ms=3, label=f"vs {base} ({rt})")
            pts = sorted({(r["tokens"], r["frac_copy_bw"], r["frac_matmul_peak"]) for r in result["records"]
                          if r["shape"] == shape and r["routing"] == rt})
            if pts:
                t, bw, pk = zip(*pts)
                axes[1][i].plot(t, bw, style, color="C3", marker="o", ms=3, label=f"frac copy BW ({rt})")
                axes[1][i].plot(t, pk, style, color="C4", marker="o", ms=3, label=f"frac matmul peak ({rt})")
        axes[0][i].set_title(shape)
        axes[0][i].axhline(1.0, color="k", lw=0.5)
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
        axes[0][i].set_ylabel("speedup of ours")
        axes[1][i].set_ylabel("fraction of ceiling")
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    fig.suptitle(f"hare.gpu.fused_moe on {result['gpu']} ({result['date']})")
    fig.tight_layout()
    path = plot_dir / "kernels_bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    from ..blocknm import BLOCK_WIDTHS, DENSITIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=None, choices=list(MODEL_SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=None)
    ap.add_argument("--routing", nargs="*", default=None, choices=list(ROUTINGS))
    ap.add_argument("--density", nargs="+", type=float, default=None, choices=list(DENSITIES),
                    help="Block N:M densities for the model shapes (sparse benchmark; default: dense kernels only); "
                    "with --suite gpt-oss the densities timed besides dense (default: all four)")
    ap.add_argument("--bw", type=int, default=16, choices=BLOCK_WIDTHS,
                    help="Block N:M block width of --density and of --suite real (synthetic fixes 16)")
    ap.add_argument("--suite", nargs="+", default=["models"], choices=[*sparse.SUITES, gpt_oss.SUITE],
                    help="models: the shapes above; real, synthetic: the Hare paper's settings (fixed cases); "
                    "gpt-oss: GPT-OSS-20B's biased experts, dense and at --density (alone; takes --tokens, "
                    "--routing, --bw)")
    ap.add_argument("--joint-panels", action="store_true",
                    help="sparse weights with joint panels (hare.patch's joint_panels=True: gate panel m and up "
                    "panel m, down panels 2m and 2m + 1 keep the same blocks), which run the one-token-tile kernels")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--plot-dir", default=None, help="sparse plots default to the JSON's folder")
    ap.add_argument("--log", default=None)
    ap.add_argument("--no-baselines", action="store_true", help="dense benchmark only")
    return ap


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.density is None and a.suite == ["models"]:
        run_kernel_bench(shapes=a.shapes, tokens=a.tokens, routing=a.routing, out_json=a.out_json,
                         plot_dir=a.plot_dir, baselines=not a.no_baselines, log=a.log)
        return
    if a.no_baselines:
        ap.error("--no-baselines: the sparse benchmark always times its baselines")
    if gpt_oss.SUITE in a.suite:
        run_gpt_oss(ap, a)
        return
    try:
        cases = sparse.select_cases(a.suite, a.density, a.bw, shapes=a.shapes, tokens=a.tokens, routings=a.routing)
    except ValueError as exc:
        ap.error(str(exc))
    result = sparse.run_sparse_bench(cases, out_json=a.out_json, plot_dir=a.plot_dir, log=a.log,
                                     joint_panels=a.joint_panels)
    if result["errors"]:
        raise SystemExit(f"{len(result['errors'])} sparse kernel call(s) failed (see 'errors' in the results)")


def run_gpt_oss(ap, a) -> None:
    """``--suite gpt-oss``: its own layer, so neither another suite nor --shapes goes with it."""
    if a.suite != [gpt_oss.SUITE] or a.shapes:
        ap.error("--suite gpt-oss runs alone and on its own layer (no other suite, no --shapes)")
    result = gpt_oss.run_gpt_oss_bench(densities=(1.0, *(a.density or gpt_oss.DENSITY_CASES[1:])),
                                       tokens=a.tokens or gpt_oss.TOKENS, routings=a.routing or ("uniform",), bw=a.bw,
                                       out_json=a.out_json, plot_dir=a.plot_dir, log=a.log,
                                       joint_panels=a.joint_panels)
    if result["errors"]:
        raise SystemExit(f"{len(result['errors'])} hare.moe call(s) failed (see 'errors' in the results)")


if __name__ == "__main__":
    main()
