"""`hare bench kernels --density ...` and `--suite real synthetic`: the Block N:M kernels against dense baselines.

Suites (a case: T tokens routed top-k over E experts of hidden H, ffn F; the Block N:M densities to time on it):

* models     the model shapes of hare.bench.shapes at the ``--density`` values and ``--bw``; tokens 1, 16, 64,
             1024, 4096, 16384 with uniform routing, Zipf routing at 4096 only (with ``--tokens`` or
             ``--routing`` given: their full product).
* real       the Hare paper's real-world setting: 4096 tokens, top-1 over 4 experts, each expert the FFN of
             Mixtral-8x22B, Mixtral-8x7B, MiniCPM-MoE-8x2B, DeepSeek-MoE-16B or Qwen3-30B-A3B; densities 50/25/10 %.
* synthetic  the paper's sweep: density 25 %, bw 16, hidden 512..16384, tokens 512..16384, 2..8 experts, top-1,
             uniform routing. ffn = 4·hidden capped at 16384 (Mixtral-8x22B's, the largest real expert here):
             uncapped, hidden 16384 means 51.5 GB of dense bf16 experts (8 x 3 x 16384 x 65536 x 2 B), and the run
             also holds their densified Block N:M copy (the correctness reference), sparsify's temporaries and
             the inputs; capped, the largest stack is 12.9 GB.

Methods on the same routing, timed like the dense benchmark (hare.bench.toolkit.Timer: CUDA-graph replays, L2
flushed, median):

* ours_sparse  hare.gpu.fused_moe with both weights Block N:M (hare.sparsify of the dense weights on the GPU)
* ours         the same kernel on the dense weights
* grouped_mm   torch._grouped_mm on the dense weights (hare.bench.baselines.grouped_mm_fn)
* cusparselt   cuSPARSELt 2:4 through torch: every expert 2:4-pruned and compressed with
               to_sparse_semi_structured once per weight stack, then one F.linear pair per touched expert like the
               cuBLAS loop. Compressing E experts and the per-call setup of every expert's matmul are costly, so it
               runs only for E <= 8, T >= 1024 and not in the synthetic sweep; ``cusparselt_status`` says why not.

Records keep the dense benchmark's schema, one per case, density and baseline: ``ours_ms`` is ours_sparse,
``speedup`` = baseline_ms / ours_ms (the dense kernel is baseline "ours"), ``density`` the true density of the
weights used, ``flops`` the dense-equivalent 6·T·k·H·F, ``min_bytes`` the compressed bytes (values + meta +
block_idx of the touched experts) + x + out; added: suite, bw, bn, bm, nominal_density, times_ms (every method),
speedup_vs_grouped_mm, speedup_vs_ours, and rel_err_vs_grouped_mm against grouped_mm on the densified weights.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocknm import DENSITIES, BlockNM, expert_layout
from ..metrics import relative_error
from .baselines import cublas_loop_fn, cusparselt_weights, grouped_mm_fn
from .common import geomean, pyplot, report_run, results, save_progress
from .shapes import MODEL_SHAPES
from .toolkit import (ROUTINGS, BenchSession, densify, make_case, make_weights, moe_flops, sparsify_experts,
                      traffic_bytes, weight_density)

SUITES = ("models", "real", "synthetic")
MODEL_TOKENS = (1, 16, 64, 1024, 4096, 16384)
ZIPF_TOKENS = (4096,)
PAPER_TOKENS, PAPER_EXPERTS, PAPER_DENSITIES = 4096, 4, (0.5, 0.25, 0.1)
PAPER_REAL_SHAPES = {  # (hidden, ffn) of one expert
    "mixtral-8x22b": MODEL_SHAPES["mixtral-8x22b"][:2],
    "mixtral-8x7b": MODEL_SHAPES["mixtral-8x7b"][:2],
    "minicpm-moe-8x2b": MODEL_SHAPES["minicpm-moe-8x2b"][:2],
    "deepseek-moe-16b": (2048, 1408),  # its config: hidden_size, moe_intermediate_size
    "qwen3-30b-a3b": MODEL_SHAPES["qwen3-30b-a3b"][:2],
}
SYNTH_HIDDEN = (512, 1024, 2048, 4096, 8192, 16384)
SYNTH_TOKENS = (512, 2048, 8192, 16384)
SYNTH_EXPERTS = (2, 4, 6, 8)
SYNTH_DENSITY, SYNTH_BW, SYNTH_FFN_CAP = 0.25, 16, 16384
CUSPARSELT_MAX_EXPERTS, CUSPARSELT_MIN_TOKENS = 8, 1024
PREFILL_TOKENS, DECODE_TOKENS = 4096, 64
TARGET_SPEEDUP = {0.5: 1.6, 0.25: 3.2, 0.1: 7.0}  # the prefill targets over grouped_mm
TARGET_DECODE_BW = 0.8  # the decode target: fraction of the copy bandwidth on the compressed bytes


@dataclass(frozen=True)
class Case:
    suite: str
    shape: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    routing: str
    tokens: int
    densities: tuple[float, ...]
    bw: int

    @property
    def name(self) -> str:
        return f"{self.shape}/{self.routing}"


# ------------------------------------------------------------------------------------------ suites
def model_cases(densities, bw=16, shapes=None, tokens=None, routings=None) -> list[Case]:
    if tokens or routings:
        pairs = [(rt, T) for rt in routings or ROUTINGS for T in tokens or MODEL_TOKENS]
    else:
        pairs = [("uniform", T) for T in MODEL_TOKENS] + [("zipf", T) for T in ZIPF_TOKENS]
    return [Case("models", s, *MODEL_SHAPES[s], rt, T, tuple(densities), bw) for s in shapes or MODEL_SHAPES for rt, T in pairs]


def paper_real_cases(bw=16) -> list[Case]:
    return [Case("real", name, H, F, PAPER_EXPERTS, 1, "uniform", PAPER_TOKENS, PAPER_DENSITIES, bw)
            for name, (H, F) in PAPER_REAL_SHAPES.items()]


def paper_synthetic_cases() -> list[Case]:
    return [Case("synthetic", f"h{H}-e{E}", H, min(4 * H, SYNTH_FFN_CAP), E, 1, "uniform", T, (SYNTH_DENSITY,),
                 SYNTH_BW)
            for H in SYNTH_HIDDEN for E in SYNTH_EXPERTS for T in SYNTH_TOKENS]


def select_cases(suites, densities=None, bw=16, shapes=None, tokens=None, routings=None) -> list[Case]:
    """The cases of the named suites; the --density/--shapes/--tokens/--routing options belong to 'models'."""
    if "models" in suites and not densities:
        raise ValueError("--suite models needs --density for the sparse benchmark")
    if "models" not in suites and (densities or shapes or tokens or routings):
        raise ValueError("--density, --shapes, --tokens and --routing apply to --suite models; "
                         "the paper suites fix their cases")
    build = {"models": lambda: model_cases(densities, bw, shapes, tokens, routings),
             "real": lambda: paper_real_cases(bw), "synthetic": paper_synthetic_cases}
    return [c for s in dict.fromkeys(suites) for c in build[s]()]


def cusparselt_skip_reason(c: Case) -> str | None:
    """Why the cuSPARSELt baseline does not run on this case (None: it runs)."""
    if c.suite == "synthetic":
        return "skipped: not part of the synthetic sweep"
    if c.experts > CUSPARSELT_MAX_EXPERTS:
        return f"skipped: {c.experts} experts > {CUSPARSELT_MAX_EXPERTS} (per-expert compression and setup)"
    if c.tokens < CUSPARSELT_MIN_TOKENS:
        return f"skipped: {c.tokens} tokens < {CUSPARSELT_MIN_TOKENS}"
    return None


# ------------------------------------------------------------------------------------------ accounting
def compressed_bytes(gu: BlockNM, dn: BlockNM, touched: int, T: int, H: int) -> float:
    """values + meta + block_idx of the touched experts (every expert stores the same bytes), + x + out."""
    return traffic_bytes((gu.nbytes + dn.nbytes) / gu.num_experts, touched, T, H)


def case_records(c: Case, counts, gu: BlockNM, dn: BlockNM, times: dict, ceil: dict, err: float,
                 cusparselt_status: str) -> list[dict]:
    """One case at one density: a record per baseline in ``times`` (which holds ours_sparse and the baselines, ms)."""
    touched = int((counts > 0).sum())
    flops = moe_flops(c.tokens * c.top_k, c.hidden, c.ffn)
    nbytes = compressed_bytes(gu, dn, touched, c.tokens, c.hidden)
    t = times["ours_sparse"]
    tflops, tbps = flops / (t * 1e-3) / 1e12, nbytes / (t * 1e-3) / 1e12
    base = {"bench": "kernels", "suite": c.suite, "case": c.name, "tokens": c.tokens, "density": weight_density(gu, dn),
            "nominal_density": gu.bn / (2 * gu.bm), "bw": gu.bw, "bn": gu.bn, "bm": gu.bm,
            "density_gate_up": gu.density, "density_down": dn.density, "joint_panels": gu.joint is not None,
            "shape": c.shape, "routing": c.routing,
            "hidden": c.hidden, "ffn": c.ffn, "experts": c.experts, "top_k": c.top_k, "touched_experts": touched,
            "max_rows_per_expert": int(counts.max()), "flops": flops, "min_bytes": nbytes, "method": "ours_sparse",
            "ours_ms": t, "times_ms": dict(times), "speedup_vs_grouped_mm": times["grouped_mm"] / t,
            "speedup_vs_ours": times["ours"] / t, "ours_tflops": tflops, "ours_tbps": tbps,
            "frac_matmul_peak": tflops / ceil["matmul_tflops"], "frac_copy_bw": tbps / ceil["copy_tbps"],
            "rel_err_vs_grouped_mm": err, "cusparselt_status": cusparselt_status}
    return [dict(base, baseline=name, baseline_ms=ms, speedup=ms / t, baseline_tflops=flops / (ms * 1e-3) / 1e12)
            for name, ms in times.items() if name != "ours_sparse"]


# ------------------------------------------------------------------------------------------ main loop
def run_sparse_bench(cases, out_json=None, plot_dir=None, log=None, device="cuda", seed=0, print_table=True,
                     joint_panels: bool = False) -> dict:
    """Time every case; returns the JSON dict, also written to ``out_json`` after each weight stack (so a run cut
    short keeps what it measured). A failing sparse call is recorded under "errors" and the run goes on.
    ``joint_panels``: prune with hare.patch's joint-panel layout (``hare.blocknm.expert_layout``)."""
    import hare.gpu as hg

    session = BenchSession(device, seed, log)
    dev, gen, say, ceil, timer = session.dev, session.gen, session.say, session.ceil, session.timer
    result = results(dev, {}, [], ceilings=ceil, suites=list(dict.fromkeys(c.suite for c in cases)), wall_s=0.0,
                     errors=[])
    t_start = time.perf_counter()
    stacks = {}
    for c in cases:  # one weight stack per (hidden, ffn), as many experts as its largest case
        stacks.setdefault((c.hidden, c.ffn), []).append(c)
    for group in stacks.values():
        _run_stack(hg, group, dev, gen, timer, ceil, result, say, joint_panels)
        save_progress(result, summary(result["records"]), t_start, out_json)
    report_run(result, out_json, plot_dir, "kernels_sparse", plot_sparse,
               [format_sparse_table(result), target_summary(result["records"])] if print_table else None, say)
    session.close()
    return result


def _run_stack(hg, group, dev, gen, timer, ceil, result, say, joint_panels):
    """All cases of one weight stack: dense baselines once per case, then every density's sparse kernel."""
    H, F = group[0].hidden, group[0].ffn
    wgu, wd = make_weights(max(c.experts for c in group), H, F, dev, gen)
    inputs = {c: make_case(c.tokens, H, c.experts, c.top_k, c.routing, dev, gen) for c in group}
    baselines, cslt = {}, None
    for c in group:
        x, ids, w = inputs[c]
        gu, dn = wgu[:c.experts], wd[:c.experts]
        times = {"grouped_mm": timer.time_graph(grouped_mm_fn(x, ids, w, gu.transpose(1, 2), dn.transpose(1, 2))),
                 "ours": timer.time_graph(functools.partial(hg.fused_moe, x, ids, w, gu, dn))}
        status = cusparselt_skip_reason(c)
        if status is None:
            try:
                cslt = cslt or cusparselt_weights(wgu, wd)
                times["cusparselt"] = timer.time_graph(cublas_loop_fn(x, ids, w, cslt[0][:c.experts],
                                                                      cslt[1][:c.experts]))
                status = "ran"
            except Exception as exc:  # noqa: BLE001 - the baseline is optional; record why it did not run
                status = f"failed: {type(exc).__name__}: {exc}"
        baselines[c] = (times, status)
    del cslt
    torch.cuda.empty_cache()
    variants = sorted({(d, c.bw) for c in group for d in c.densities}, reverse=True)
    for density, bw in variants:
        bn, bm = DENSITIES[density]
        sgu = sparsify_experts(wgu, bn, bm, bw, **expert_layout("gate_up", 2 * F, joint_panels))
        sdn = sparsify_experts(wd, bn, bm, bw, **expert_layout("down", H, joint_panels))
        todo = [c for c in group if density in c.densities and c.bw == bw]
        refs = _references(todo, inputs, sgu, sdn)
        for c in todo:
            x, ids, w = inputs[c]
            gu, dn = sgu.select_experts(0, c.experts), sdn.select_experts(0, c.experts)
            fn = functools.partial(hg.fused_moe, x, ids, w, gu, dn)
            try:
                err = relative_error(fn(), refs[c])
                t = timer.time_graph(fn)
            except Exception as exc:  # noqa: BLE001 - keep the other measurements; the run reports the failure
                result["errors"].append({"case": c.name, "suite": c.suite, "tokens": c.tokens, "density": density,
                                         "bw": bw, "error": f"{type(exc).__name__}: {exc}"})
                say(json.dumps(result["errors"][-1]))
                continue
            times, status = baselines[c]
            counts = torch.bincount(ids.reshape(-1), minlength=c.experts)
            recs = case_records(c, counts, gu, dn, {"ours_sparse": t, **times}, ceil, err, status)
            result["records"] += recs
            say(json.dumps({k: v for k, v in recs[0].items() if k not in ("baseline", "baseline_ms", "speedup",
                                                                          "baseline_tflops")}))
        del sgu, sdn, refs
        torch.cuda.empty_cache()


def _references(cases, inputs, gu: BlockNM, dn: BlockNM) -> dict:
    """grouped_mm's output on the densified Block N:M weights, per case (the densified stacks are freed on return)."""
    dgu, ddn = densify(gu), densify(dn)
    return {c: grouped_mm_fn(*inputs[c], dgu[:c.experts].transpose(1, 2), ddn[:c.experts].transpose(1, 2))()
            for c in cases}


# ------------------------------------------------------------------------------------------ reports
def _by_baseline(records, baseline):
    return [r for r in records if r["baseline"] == baseline]


def summary(records) -> dict:
    """Geometric-mean speedup of ours_sparse over grouped_mm per suite and nominal density:
    ``<suite>/geomean_speedup_vs_grouped_mm_at_<density>``."""
    one = _by_baseline(records, "grouped_mm")
    groups = dict.fromkeys((r["suite"], r["nominal_density"]) for r in one)
    return {f"{suite}/geomean_speedup_vs_grouped_mm_at_{d:g}":
            geomean(r["speedup"] for r in one if (r["suite"], r["nominal_density"]) == (suite, d))
            for suite, d in groups}


def format_sparse_table(result) -> str:
    """One row per case (ms of the dense methods; per density: speedup over grouped_mm and over ours, % of copy BW);
    the synthetic sweep as one row per hidden size."""
    c = result["ceilings"]
    one = _by_baseline(result["records"], "grouped_mm")
    dens = sorted({r["nominal_density"] for r in one if r["suite"] != "synthetic"}, reverse=True)
    lines = [f"GPU {result['gpu']}  copy {c['copy_tbps']:.2f} TB/s  matmul {c['matmul_tflops']:.0f} TFLOP/s  "
             f"(xgrp, xours: speedup of ours_sparse; %bw: compressed bytes / time vs copy BW)",
             f"{'case':<30}{'T':>6}{'grp_mm':>9}{'ours':>9}{'cslt':>9}"
             + "".join(f"{f'{d:.0%} xgrp':>11}{'xours':>6}{'%bw':>5}" for d in dens) + f"{'err':>9}"]
    rows = {}
    for r in one:
        if r["suite"] != "synthetic":
            rows.setdefault((r["suite"], r["case"], r["tokens"]), {})[r["nominal_density"]] = r
    for (suite, case, T), by_d in rows.items():
        t = next(iter(by_d.values()))["times_ms"]
        line = (f"{suite[0] + ':' + case:<30}{T:>6}{t['grouped_mm']:>9.4f}{t['ours']:>9.4f}"
                f"{t.get('cusparselt', math.nan):>9.4f}")
        for d in dens:
            r = by_d.get(d)
            line += (f"{r['speedup_vs_grouped_mm']:>11.2f}{r['speedup_vs_ours']:>6.2f}{100 * r['frac_copy_bw']:>5.0f}"
                     if r else f"{'-':>11}{'-':>6}{'-':>5}")
        lines.append(line + f"{max(r['rel_err_vs_grouped_mm'] for r in by_d.values()):>9.1e}")
    synth = [r for r in one if r["suite"] == "synthetic"]
    for H in sorted({r["hidden"] for r in synth}):
        sel = [r for r in synth if r["hidden"] == H]
        xg = [r["speedup"] for r in sel]
        lines.append(f"synthetic h={H} f={sel[0]['ffn']} ({len(sel)} cases): speedup over grouped_mm geomean "
                     f"{geomean(xg):.2f}x ({min(xg):.2f}-{max(xg):.2f}), over ours "
                     f"{geomean([r['speedup_vs_ours'] for r in sel]):.2f}x, "
                     f"max err {max(r['rel_err_vs_grouped_mm'] for r in sel):.1e}")
    return "\n".join(lines)


def target_summary(records) -> str:
    """The issue's targets per suite and density: prefill (T >= 4096) geomean speedup over grouped_mm; decode
    (T <= 64) fraction of the copy bandwidth on the compressed bytes."""
    one = _by_baseline(records, "grouped_mm")
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in one):
        for d in sorted({r["nominal_density"] for r in one if r["suite"] == suite}, reverse=True):
            sel = [r for r in one if r["suite"] == suite and r["nominal_density"] == d]
            pre = [r["speedup"] for r in sel if r["tokens"] >= PREFILL_TOKENS]
            if pre:
                g, target = geomean(pre), TARGET_SPEEDUP.get(d)
                verdict = "no target" if target is None else f"target {target}x {'met' if g >= target else 'MISSED'}"
                lines.append(f"prefill {suite:<9} {d:>4.0%}: geomean {g:.2f}x over grouped_mm "
                             f"({len(pre)} cases, T >= {PREFILL_TOKENS}); {verdict}")
            dec = [r["frac_copy_bw"] for r in sel if r["tokens"] <= DECODE_TOKENS]
            if dec:
                met = sum(f >= TARGET_DECODE_BW for f in dec)
                lines.append(f"decode  {suite:<9} {d:>4.0%}: {min(dec):.0%}..{max(dec):.0%} of copy BW on compressed "
                             f"bytes (median {statistics.median(dec):.0%}); {met}/{len(dec)} cases >= "
                             f"{TARGET_DECODE_BW:.0%} target")
    return "\n".join(lines)


def plot_sparse(result, plot_dir: Path, stem: str) -> list[Path]:
    """The PNGs that apply: ``<stem>_speedup.png`` (models/real records), ``<stem>_synthetic.png``."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    recs = result["records"]
    paths = []
    if any(r["suite"] != "synthetic" for r in recs):
        paths.append(plot_speedup(result, plot_dir / f"{stem}_speedup.png"))
    if any(r["suite"] == "synthetic" for r in recs):
        paths.append(plot_synthetic(result, plot_dir / f"{stem}_synthetic.png"))
    return paths


def plot_speedup(result, path: Path) -> Path:
    """Grouped bars: speedup of ours_sparse over grouped_mm per shape (groups) and density (bars), one panel per
    suite, routing and token count; dashed lines mark the prefill targets."""
    plt = pyplot()
    one = [r for r in _by_baseline(result["records"], "grouped_mm") if r["suite"] != "synthetic"]
    panels = list(dict.fromkeys((r["suite"], r["routing"], r["tokens"]) for r in one))
    dens = sorted({r["nominal_density"] for r in one}, reverse=True)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    width = 0.8 / len(dens)
    for ax, (suite, rt, T) in zip(axes.flat, panels):
        sel = [r for r in one if (r["suite"], r["routing"], r["tokens"]) == (suite, rt, T)]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        for i, d in enumerate(dens):
            ys = {r["shape"]: r["speedup"] for r in sel if r["nominal_density"] == d}
            xs = [j + (i - (len(dens) - 1) / 2) * width for j, s in enumerate(shapes) if s in ys]
            ax.bar(xs, [ys[s] for s in shapes if s in ys], width, color=f"C{i}", label=f"{d:.0%}")
            if T >= PREFILL_TOKENS and d in TARGET_SPEEDUP:
                ax.axhline(TARGET_SPEEDUP[d], color=f"C{i}", ls="--", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{suite}: {rt}, T={T}", fontsize=9)
        ax.set_ylabel("speedup over grouped_mm")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(title="density", fontsize=7)
    fig.suptitle(f"hare.gpu.fused_moe, Block N:M weights, on {result['gpu']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_synthetic(result, path: Path) -> Path:
    """Box plot per hidden size of the synthetic sweep's speedups (over tokens x experts): over grouped_mm and over
    our dense kernel."""
    plt = pyplot()
    synth = [r for r in result["records"] if r["suite"] == "synthetic"]
    hidden = sorted({r["hidden"] for r in synth})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, base in zip(axes[0], ("grouped_mm", "ours")):
        ax.boxplot([[r["speedup"] for r in synth if r["hidden"] == H and r["baseline"] == base] for H in hidden])
        ax.set_xticks(range(1, len(hidden) + 1), [str(H) for H in hidden])
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel(f"hidden (ffn = min(4 hidden, {SYNTH_FFN_CAP}))")
        ax.set_ylabel(f"speedup over {base}")
    fig.suptitle(f"synthetic sweep, density {SYNTH_DENSITY:.0%}, bw {SYNTH_BW}, top-1, on {result['gpu']} "
                 f"({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
