"""`hare bench kernels --suite gpt-oss`: GPT-OSS-20B's experts, biased and with its clamped SwiGLU, dense and
Block N:M, through ``hare.moe`` against PyTorch's grouped GEMM on the dense weights.

The layer is the model's (``hare.models.configs.REAL["GPT-OSS-20B"]``): hidden 2880, ffn 2880, 32 experts, top-4,
expert biases ``gate_up_bias`` (E, 2·ffn) and ``down_bias`` (E, hidden) in float32 (random, nonzero), activation
"gpt-oss". Weights: dense bf16, and Block N:M at each ``--density`` (default 50/25/10/5 %, bw ``--bw``) pruned by
magnitude from the same dense weights: gate/up in the halves layout (``hare.sparsify(..., halves=True)``: ffn 2880
is no multiple of 128, and the plain layout's panels would mix gate and up rows), down in the plain one. Tokens
1, 16, 128 (decode) and 512, 2048, 8192 (prefill), uniform routing (``--tokens``, ``--routing`` replace them).

Methods on the same routing, timed like the other kernel suites (``hare.bench.toolkit.Timer``: CUDA-graph
replays, L2 flushed before each, median):

* ours        ``hare.moe`` with the biases and activation on the weights of the density, on whichever path it
              takes there (the record's ``path``; ``path_reason`` says why not the Hopper kernels)
* grouped_mm  ``hare.grouped_mm.grouped_mm_moe`` on the dense weights with the same biases and activation (bf16
              GEMMs, float32 biases and gated unit): what a user who does not prune runs, so a sparse record's
              speedup is what pruning buys

Records keep the other kernel suites' schema, one per density and token count: ``case`` "gpt-oss-20b/<routing>",
``density`` the true density of the weights timed (1.0 dense; from the BlockNMs, not the nominal ratio),
``ours_ms``, ``baseline`` "grouped_mm", ``baseline_ms``, ``speedup``, ``flops`` (dense-equivalent 6·T·k·H·F),
``min_bytes`` (the touched experts' stored weights and biases + x + out), ``rel_err_vs_grouped_mm`` against
grouped_mm on the same weights (densified for Block N:M). A failing call of ours is recorded under "errors" and the
run goes on. Results: ``--out-json`` (``bench/results/kernels_gpt-oss_<gpu>.json`` from scripts/device_run.sh)
and a plot beside it.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from ..blocknm import DENSITIES, BlockNM, expert_layout
from ..grouped_mm import grouped_mm_moe
from ..metrics import relative_error
from ..moe import backend, moe
from .common import geomean, pyplot, report_run, results, save_progress
from .shapes import expert_shape
from .toolkit import (BenchSession, densify, make_case, make_weights, moe_flops, sparsify_experts, traffic_bytes,
                      weight_density)

SUITE = "gpt-oss"
MODEL, SHAPE = "GPT-OSS-20B", "gpt-oss-20b"
LAYER = expert_shape(MODEL)  # (hidden, ffn, experts, top-k)
ACTIVATION = "gpt-oss"
BIAS_STD = 0.1
TOKENS = (1, 16, 128, 512, 2048, 8192)
DECODE_MAX_TOKENS = 128  # records up to here count as decode in the summary, the rest as prefill
DENSITY_CASES = (1.0, *DENSITIES)  # dense first: the weights every sparse variant is pruned from


def make_biases(E: int, H: int, F: int, device, gen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float32 expert biases, gate_up_bias (E, 2F) and down_bias (E, H), of std ``BIAS_STD``."""
    return tuple(torch.randn(E, n, device=device, generator=gen) * BIAS_STD for n in (2 * F, H))


def sparse_weights(wgu: torch.Tensor, wd: torch.Tensor, density: float, bw: int = 16,
                   joint_panels: bool = False) -> tuple[BlockNM, BlockNM]:
    """The dense experts pruned by magnitude to Block N:M at ``density`` in hare.patch's layout: gate/up in the halves
    layout, down plain; ``joint_panels`` as hare.patch's."""
    bn, bm = DENSITIES[density]
    return (sparsify_experts(wgu, bn, bm, bw, **expert_layout("gate_up", wgu.shape[-2], joint_panels)),
            sparsify_experts(wd, bn, bm, bw, **expert_layout("down", wd.shape[-2], joint_panels)))


def case_record(routing: str, ids: torch.Tensor, gu, dn, biases, ours_ms: float, baseline_ms: float, err: float,
                ceil: dict, path: str, why: str) -> dict:
    """The record of ours on weights ``gu``, ``dn`` (dense tensors, or BlockNMs) with ``biases`` over the routing
    ``ids`` (T, k), against the grouped_mm baseline."""
    (T, k), (E, H, F) = ids.shape, dn.shape
    sparse = isinstance(gu, BlockNM)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    touched = int((counts > 0).sum())
    per_expert = (gu.nbytes + dn.nbytes) / E + sum(b[0].numel() * b.element_size() for b in biases)
    flops, min_bytes = moe_flops(T * k, H, F), traffic_bytes(per_expert, touched, T, H)
    tflops, tbps = flops / (ours_ms * 1e-3) / 1e12, min_bytes / (ours_ms * 1e-3) / 1e12
    layout = ({"nominal_density": gu.bn / (2 * gu.bm), "bw": gu.bw, "bn": gu.bn, "bm": gu.bm,
               "density_gate_up": gu.density, "density_down": dn.density, "halves_gate_up": gu.halves,
               "joint_panels": gu.joint is not None}
              if sparse else {"nominal_density": 1.0, "bw": None, "bn": None, "bm": None,
                              "density_gate_up": 1.0, "density_down": 1.0, "halves_gate_up": False,
                              "joint_panels": False})
    return {"bench": "kernels", "suite": SUITE, "case": f"{SHAPE}/{routing}", "tokens": T,
            "density": weight_density(gu, dn) if sparse else 1.0, **layout, "shape": SHAPE, "routing": routing,
            "hidden": H, "ffn": F, "experts": E, "top_k": k, "activation": ACTIVATION,
            "biases": {name: list(b.shape) for name, b in zip(("gate_up_bias", "down_bias"), biases)},
            "bias_dtype": str(biases[0].dtype).removeprefix("torch."), "touched_experts": touched,
            "max_rows_per_expert": int(counts.max()), "flops": flops, "min_bytes": min_bytes,
            "method": "hare.moe", "path": path, "path_reason": why, "ours_ms": ours_ms, "baseline": "grouped_mm",
            "baseline_ms": baseline_ms, "speedup": baseline_ms / ours_ms,
            "baseline_tflops": flops / (baseline_ms * 1e-3) / 1e12, "ours_tflops": tflops, "ours_tbps": tbps,
            "frac_matmul_peak": tflops / ceil["matmul_tflops"], "frac_copy_bw": tbps / ceil["copy_tbps"],
            "rel_err_vs_grouped_mm": err}


# ------------------------------------------------------------------------------------------ main loop
def run_gpt_oss_bench(densities=DENSITY_CASES, tokens=TOKENS, routings=("uniform",), bw: int = 16, out_json=None,
                      plot_dir=None, log=None, device="cuda", seed=0, layer=LAYER, print_table=True,
                      joint_panels: bool = False) -> dict:
    """Time every density (1.0: the dense weights) at every token count and routing; returns the JSON dict, also
    written to ``out_json`` after each density (a run cut short keeps what it measured). ``layer`` (hidden, ffn,
    experts, top-k) is GPT-OSS-20B's unless a test asks for a smaller one; ``joint_panels`` as hare.patch's."""
    session = BenchSession(device, seed, log)
    dev, gen, say, ceil, timer = session.dev, session.gen, session.say, session.ceil, session.timer
    H, F, E, k = layer
    result = results(dev, {}, [], ceilings=ceil, suites=[SUITE], model=MODEL, wall_s=0.0, errors=[])
    t_start = time.perf_counter()
    wgu, wd = make_weights(E, H, F, dev, gen)
    biases = make_biases(E, H, F, dev, gen)
    inputs = {(rt, T): make_case(T, H, E, k, rt, dev, gen) for rt in routings for T in tokens}
    dense_out, baseline_ms = {}, {}
    for key, args in inputs.items():
        fn = functools.partial(grouped_mm_moe, *args, wgu, wd, ACTIVATION, *biases)
        dense_out[key], baseline_ms[key] = fn(), timer.time_graph(fn)
    for density in sorted(densities, reverse=True):
        gu, dn = (wgu, wd) if density == 1.0 else sparse_weights(wgu, wd, density, bw, joint_panels)
        refs = dense_out if density == 1.0 else _references(inputs, gu, dn, biases)
        for (rt, T), (x, ids, w) in inputs.items():
            ours = functools.partial(moe, x, ids, w, gu, dn, ACTIVATION, check_ids=False, gate_up_bias=biases[0],
                                     down_bias=biases[1])  # ids from a top-k: the id check would sync the host
            try:
                err = relative_error(ours(), refs[rt, T])
                t = timer.time_graph(ours)
            except Exception as exc:  # noqa: BLE001 - keep the other measurements; the run reports the failure
                result["errors"].append({"case": f"{SHAPE}/{rt}", "suite": SUITE, "tokens": T, "density": density,
                                         "bw": bw, "error": f"{type(exc).__name__}: {exc}"})
                say(json.dumps(result["errors"][-1]))
                continue
            path, why = backend(x, gu, dn, ACTIVATION)
            result["records"].append(case_record(rt, ids, gu, dn, biases, t, baseline_ms[rt, T], err, ceil, path,
                                                 why))
            say(json.dumps(result["records"][-1]))
        del gu, dn, refs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save_progress(result, summary(result["records"]), t_start, out_json)
    report_run(result, out_json, plot_dir, f"kernels_{SUITE}", lambda *args: [plot(*args)],
               [format_table(result)] if print_table else None, say)
    session.close()
    return result


def _references(inputs, gu: BlockNM, dn: BlockNM, biases) -> dict:
    """grouped_mm's output on the densified Block N:M weights, per input (the dense copies are freed on return)."""
    dgu, ddn = densify(gu), densify(dn)
    return {key: grouped_mm_moe(*args, dgu, ddn, ACTIVATION, *biases) for key, args in inputs.items()}


# ------------------------------------------------------------------------------------------ reports
def _label(density: float) -> str:
    return "dense" if density == 1.0 else f"{density:.0%}"


def _phase(r: dict) -> str:
    return "decode" if r["tokens"] <= DECODE_MAX_TOKENS else "prefill"


def summary(records) -> dict:
    """Geometric-mean speedup of ours over dense grouped_mm per phase (decode: T <= 128) and nominal density:
    ``gpt-oss/<phase>/geomean_speedup_vs_grouped_mm_at_<density>`` (density 1: the dense weights)."""
    groups = dict.fromkeys((_phase(r), r["nominal_density"]) for r in records)
    return {f"{SUITE}/{phase}/geomean_speedup_vs_grouped_mm_at_{d:g}":
            geomean(r["speedup"] for r in records if (_phase(r), r["nominal_density"]) == (phase, d))
            for phase, d in groups}


def format_table(result) -> str:
    """One row per routing and token count: grouped_mm's ms, then per density ours' ms and speedup; a line per
    density says which path ``hare.moe`` took."""
    c, recs = result["ceilings"], result["records"]
    dens = sorted({r["nominal_density"] for r in recs}, reverse=True)
    lines = [f"GPU {result['gpu']}  copy {c['copy_tbps']:.2f} TB/s  matmul {c['matmul_tflops']:.0f} TFLOP/s  "
             f"({MODEL} experts, biases, {ACTIVATION}; x: speedup of hare.moe over dense grouped_mm)",
             f"{'case':<24}{'T':>6}{'grp_mm':>9}" + "".join(f"{_label(d):>9}{'x':>6}" for d in dens) + f"{'err':>9}"]
    rows = {}
    for r in recs:
        rows.setdefault((r["case"], r["tokens"]), {})[r["nominal_density"]] = r
    for (case, T), by_d in rows.items():
        line = f"{case:<24}{T:>6}{next(iter(by_d.values()))['baseline_ms']:>9.4f}"
        for d in dens:
            r = by_d.get(d)
            line += f"{r['ours_ms']:>9.4f}{r['speedup']:>6.2f}" if r else f"{'-':>9}{'-':>6}"
        lines.append(line + f"{max(r['rel_err_vs_grouped_mm'] for r in by_d.values()):>9.1e}")
    for d in dens:
        paths = dict.fromkeys((r["path"], r["path_reason"]) for r in recs if r["nominal_density"] == d)
        lines.append(f"{_label(d):>5}: " + "; ".join(f"{p}" + (f" ({why})" if why else "") for p, why in paths))
    return "\n".join(lines)


def plot(result, plot_dir: Path, stem: str) -> Path:
    """``<stem>.png``: speedup of ours over dense grouped_mm against tokens, a line per density and routing."""
    plt = pyplot()
    plot_dir.mkdir(parents=True, exist_ok=True)
    recs = result["records"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, d in enumerate(sorted({r["nominal_density"] for r in recs}, reverse=True)):
        for rt, style in zip(dict.fromkeys(r["routing"] for r in recs), ("-", "--")):
            pts = sorted((r["tokens"], r["speedup"]) for r in recs if r["nominal_density"] == d and r["routing"] == rt)
            ax.plot(*zip(*pts), style, color=f"C{i}", marker="o", ms=3,
                    label=f"{_label(d)} ({rt})")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("speedup over dense grouped_mm")
    ax.legend(fontsize=7)
    ax.set_title(f"hare.moe on {MODEL}'s experts (biases, {ACTIVATION}), {result['gpu']} ({result['date']})",
                 fontsize=9)
    fig.tight_layout()
    path = plot_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
