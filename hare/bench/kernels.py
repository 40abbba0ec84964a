"""`hare bench kernels`: the fused MoE kernels of hare.gpu against torch baselines on the same routing.

Shapes: six MoE models (hidden -> ffn, experts, top-k); tokens 1..16384; uniform and Zipf-skewed routing.
Methods, all timed as CUDA-graph replays (median of several, L2 flushed before each replay, CUDA events):

* ours        hare.gpu.fused_moe (layout build + gate/up + down + combine), deterministic mode (the default)
* ours_fast   the same with deterministic=False (fp32 atomics), an extra key
* grouped_mm  torch._grouped_mm with the routing it needs (stable argsort, counts, offsets), the gather of x,
              the activation, the weight multiply and the scatter/sum back to tokens
* layout      hare.gpu.build_layout alone (block 128), 20 builds per graph replay, time / 20
* cublas_loop one torch.mm pair per touched expert (index lists prepared on the host, outside the timing)
* padded      every expert rounded up to 128 rows (zero rows), then grouped_mm, like a padded/bmm layout

Reports time, speedup, TFLOP/s and bytes/s (touched experts' weights + x + out) and their fractions of the
matrix peak and copy bandwidth measured in the same run; writes JSON records and a PNG plot; prints a table.
With ``--density`` (Block N:M weights) or ``--suite real synthetic`` (the Hare paper's settings) it runs the sparse
benchmark of hare.bench.sparse instead, with the same timer, ceilings, inputs and baselines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

from .common import git_commit
from .shapes import MODEL_SHAPES

SHAPES = MODEL_SHAPES
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
ROUTINGS = ("uniform", "zipf")
ZIPF_S = 1.2


# ------------------------------------------------------------------------------------------ timing
class Timer:
    def __init__(self, device):
        self.flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)

    def time_graph(self, fn, budget_s: float = 0.25, max_reps: int = 30, min_reps: int = 3) -> float:
        """Median ms of CUDA-graph replays of fn() (warmed up and captured first), L2 flushed before each."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return self.time_replay(g.replay, budget_s, max_reps, min_reps)

    def time_replay(self, replay, budget_s: float = 0.25, max_reps: int = 30, min_reps: int = 3) -> float:
        """Median ms of replay() (a captured graph's), L2 flushed before each."""
        replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay()
        torch.cuda.synchronize()
        est = time.perf_counter() - t0
        reps = int(max(min_reps, min(max_reps, budget_s / max(est, 1e-6))))
        times = []
        for _ in range(reps):
            self.flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        return times[len(times) // 2]


def measure_ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written; best of a memcpy and an elementwise kernel, in a graph and eager),
    read bandwidth (a sum), and the bf16 matmul rate (8192^3), all measured here."""
    t = Timer(device)
    n = 1024 * 1024 * 1024 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 4
    times = [t.time_graph(lambda: dst.copy_(src), budget_s=0.1),
             t.time_graph(lambda: torch.mul(src, 1.0, out=dst), budget_s=0.1)]
    for _ in range(2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    copy_tbps = nbytes / (min(times) * 1e-3) / 1e12
    out = torch.empty((), device=device)
    read_ms = t.time_graph(lambda: torch.sum(src, dim=0, out=out), budget_s=0.1)
    read_tbps = src.numel() * 4 / (read_ms * 1e-3) / 1e12
    src = dst = None
    a = torch.randn(8192, 8192, device=device).to(torch.bfloat16)
    b = torch.randn(8192, 8192, device=device).to(torch.bfloat16)
    ms = t.time_graph(lambda: a @ b, budget_s=0.2)
    peak = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_tbps": copy_tbps, "read_tbps": read_tbps, "matmul_tflops": peak}


# ------------------------------------------------------------------------------------------ inputs
def make_weights(H, F, E, device, gen):
    """Random bf16 experts scaled to unit-variance outputs: w_gate_up (E, 2F, H), w_down (E, H, F)."""
    wgu = (torch.randn(E, 2 * F, H, device=device, generator=gen) * H**-0.5).to(torch.bfloat16)
    wd = (torch.randn(E, H, F, device=device, generator=gen) * F**-0.5).to(torch.bfloat16)
    return wgu, wd


def moe_flops(rows, H, F) -> float:
    """Dense FLOPs of R routed rows: gate/up 4·R·H·F + down 2·R·H·F (a sparse kernel's dense equivalent)."""
    return 6.0 * rows * H * F


def traffic_bytes(expert_bytes, touched, T, H) -> float:
    """Fewest bytes a layer moves: the touched experts' weights (``expert_bytes`` each) + x + out (bf16)."""
    return touched * expert_bytes + 2.0 * T * H * 2


def make_case(T, H, E, k, routing, device, gen):
    x = torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16)
    if routing == "uniform":
        probs = torch.ones(E, device=device)
    else:
        probs = torch.arange(1, E + 1, device=device, dtype=torch.float32) ** (-ZIPF_S)
        probs = probs[torch.randperm(E, device=device, generator=gen)]
    ids = torch.multinomial(probs.expand(T, E), k, replacement=False, generator=gen)
    w = torch.softmax(torch.randn(T, k, device=device, generator=gen), dim=-1)
    return x, ids, w


# ------------------------------------------------------------------------------------------ baselines
def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _act(name):
    return Fn.silu if name == "silu" else (lambda t: Fn.gelu(t, approximate="tanh"))


def grouped_mm_fn(x, ids, w, wgu_t, wd_t, activation="silu"):
    T, k = ids.shape
    E, F = wd_t.shape[0], wd_t.shape[1]
    H = x.shape[1]
    act = _act(activation)

    def run():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[order // k]
        gu = torch._grouped_mm(xs, wgu_t, offs=offs)
        h = act(gu[:, :F]) * gu[:, F:]
        y = torch._grouped_mm(h, wd_t, offs=offs)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        yy = torch.empty_like(y)
        yy[order] = y
        return yy.view(T, k, H).sum(1)

    return run


def cublas_loop_fn(x, ids, w, wgu, wd, activation="silu"):
    """One linear pair per touched expert; wgu[e] (2F, H) and wd[e] (H, F) may be any weights F.linear takes
    (dense, or the 2:4-compressed tensors of the cuSPARSELt baseline in hare.bench.sparse)."""
    T, k = ids.shape
    E = len(wgu)
    F = wd[0].shape[1]
    act = _act(activation)
    groups = []
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            groups.append((e, tok, w[tok, slot].to(torch.float32)[:, None]))

    def run():
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        for e, tok, we in groups:
            gu = Fn.linear(x[tok], wgu[e])
            h = act(gu[:, :F]) * gu[:, F:]
            y = Fn.linear(h, wd[e])
            out.index_add_(0, tok, y.float() * we)
        return out.to(torch.bfloat16)

    return run


def padded_fn(x, ids, w, wgu_t, wd_t, activation="silu", pad=128):
    T, k = ids.shape
    E, F = wd_t.shape[0], wd_t.shape[1]
    H = x.shape[1]
    act = _act(activation)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + pad - 1) // pad * pad
    poffs = torch.cumsum(padded, 0)
    pstart = poffs - padded
    sorted_e = flat[order]
    rank = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    prow = pstart[sorted_e] + rank  # padded row of each sorted assignment
    P = int(poffs[-1])
    src = torch.full((P,), T, dtype=torch.int64, device=x.device)  # row T of x_ext is zeros
    src[prow] = order // k
    poffs32 = poffs.to(torch.int32)
    # the padded layout is built once per routing (host sync); the timed part is the padded compute

    def run():
        x_ext = torch.cat([x, x.new_zeros(1, H)])
        xs = x_ext[src]
        gu = torch._grouped_mm(xs, wgu_t, offs=poffs32)
        h = act(gu[:, :F]) * gu[:, F:]
        y = torch._grouped_mm(h, wd_t, offs=poffs32)[prow]
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        yy = torch.empty_like(y)
        yy[order] = y
        return yy.view(T, k, H).sum(1)

    return run


# ------------------------------------------------------------------------------------------ main loop
class BenchSession:
    """What every kernel benchmark run sets up first: the checked device, TF32 off, a seeded generator, the ceilings
    measured in this run, a timer, and the optional log file (``say`` writes a line to it)."""

    def __init__(self, device="cuda", seed: int = 0, log=None):
        import hare.gpu as hg

        self.dev = torch.device(device)
        ok, why = hg.availability(self.dev)
        if not ok:
            raise RuntimeError(f"hare.gpu is not available: {why}")
        torch.backends.cuda.matmul.allow_tf32 = False
        self.gen = torch.Generator(device=self.dev).manual_seed(seed)
        self._log = open(log, "w") if log else None
        self.ceil = measure_ceilings(self.dev)
        self.say(f"ceilings: {self.ceil}")
        self.timer = Timer(self.dev)

    def say(self, msg: str) -> None:
        if self._log:
            self._log.write(msg + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log:
            self._log.close()


def run_kernel_bench(shapes=None, tokens=None, routing=None, out_json=None, plot_dir=None, baselines=True,
                     log=None, device="cuda", seed=0, print_table=True) -> dict:
    """Run the benchmark; returns the JSON dict (also written to ``out_json`` when given)."""
    import hare.gpu as hg
    from hare.gpu import ops

    session = BenchSession(device, seed, log)
    dev, gen, say, ceil, timer = session.dev, session.gen, session.say, session.ceil, session.timer
    shapes = list(shapes or SHAPES)
    tokens = list(tokens or TOKENS)
    routings = list(routing or ROUTINGS) if not isinstance(routing, str) else [routing]
    records = []
    t_start = time.perf_counter()
    for shape in shapes:
        H, F, E, k = SHAPES[shape]
        wgu, wd = make_weights(H, F, E, dev, gen)
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
                            "block_n": ops.choose_block_n(R, E)}
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
                    extra["rel_err_vs_grouped_mm"] = rel_err(out, ref)
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
    result = {
        "gpu": torch.cuda.get_device_name(dev),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": ceil,
        "launch_overhead": launch,
        "wall_s": time.perf_counter() - t_start,
        "records": records,
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
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
    """Eager (Python + driver launches) vs graph-replay time of one small fused_moe call."""
    import hare.gpu as hg

    H, F, E, k = SHAPES["qwen3-30b-a3b"]
    gen = torch.Generator(device=dev).manual_seed(1)
    wgu, wd = make_weights(H, F, E, dev, gen)
    x, ids, w = make_case(1, H, E, k, "uniform", dev, gen)
    for _ in range(5):
        hg.fused_moe(x, ids, w, wgu, wd)
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        hg.fused_moe(x, ids, w, wgu, wd)
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - t0) / n * 1e6
    from hare.gpu import ops

    t0 = time.perf_counter()
    for _ in range(n):
        ops.fused_moe_impl(x, ids, w, wgu, None, None, 0, wd, None, None, 0, "silu", True)  # dense: no meta
    torch.cuda.synchronize()
    impl_us = (time.perf_counter() - t0) / n * 1e6
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        hg.fused_moe(x, ids, w, wgu, wd)
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - t0) / n * 1e6
    return {"case": "qwen3-30b-a3b T=1", "eager_custom_op_us": eager_us, "eager_impl_us": impl_us,
            "graph_replay_us": graph_us}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    shapes = sorted({r["shape"] for r in result["records"]}, key=list(SHAPES).index)
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
    from .sparse import SUITES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=None)
    ap.add_argument("--routing", nargs="*", default=None, choices=list(ROUTINGS))
    ap.add_argument("--density", nargs="+", type=float, default=None, choices=list(DENSITIES),
                    help="Block N:M densities for the model shapes (sparse benchmark; default: dense kernels only)")
    ap.add_argument("--bw", type=int, default=16, choices=BLOCK_WIDTHS,
                    help="Block N:M block width of --density and of --suite real (synthetic fixes 16)")
    ap.add_argument("--suite", nargs="+", default=["models"], choices=SUITES,
                    help="models: the shapes above; real, synthetic: the Hare paper's settings (fixed cases)")
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
    from .sparse import run_sparse_bench, select_cases

    if a.no_baselines:
        ap.error("--no-baselines: the sparse benchmark always times its baselines")
    try:
        cases = select_cases(a.suite, a.density, a.bw, shapes=a.shapes, tokens=a.tokens, routings=a.routing)
    except ValueError as exc:
        ap.error(str(exc))
    result = run_sparse_bench(cases, out_json=a.out_json, plot_dir=a.plot_dir, log=a.log)
    if result["errors"]:
        raise SystemExit(f"{len(result['errors'])} sparse kernel call(s) failed (see 'errors' in the results)")


if __name__ == "__main__":
    main()
