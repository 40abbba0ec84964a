"""``hare bench accuracy``: what each density and pruning method costs on a trained MoE model.

For a transformers MoE checkpoint (``hare bench train-moe`` makes one) and the corpus' calibration and validation
text, every record prunes a fresh copy of the dense model and measures the validation perplexity and
``layer_rel_err``, the mean over MoE layers of the relative output error of the pruned experts on the calibration
tokens. Records: Block N:M at each density x method (magnitude, activation-aware, reconstruct) x block width, and
the references that price the hierarchy itself: unstructured pruning at the same density (per output row, by
magnitude or activation score) and plain 2:4 (activation score) at 50%. Joint-panel records (``joint_panels``:
``hare.patch(..., joint_panels=True)``) price that option for activation-aware and reconstruct at bw 16, when
the model's ffn is a multiple of 128. Evaluation runs in float32 on
``hare.moe``'s reference path (what pruning costs, without bf16 rounding on top). Writes the JSON, a plot and a
markdown table. ``time_layer`` times the reconstruction pruner on a random layer of Mixtral-8x7B's size.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ..blocknm import DENSITIES, GROUP, PANEL
from ..errors import InvalidArgumentError
from ..metrics import relative_error
from ..models.experts import HareExperts
from ..models.patch import calibrate, dense_experts, experts_modules, patch, replace_module
from ..reconstruct import reconstruct
from .common import pyplot, run_info, save_results
from .trained_moe import INFO, read_split

METHODS = ("magnitude", "activation", "reconstruct")
JOINT_METHODS, JOINT_BW = ("activation", "reconstruct"), 16  # the joint-panel records
BLOCK_WIDTHS = (16, 32, 64)
EVAL = "float32 weights and activations, hare.moe reference path (PyTorch)"


def _row_topk_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """Unstructured: each output row keeps its round(density·in) highest-scored weights."""
    k = max(1, round(density * score.shape[-1]))
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def _two_four_mask(score: torch.Tensor) -> torch.Tensor:
    """Plain 2:4: the 2 highest-scored of every 4 consecutive weights of a row."""
    groups = score.reshape(*score.shape[:-1], -1, GROUP)
    idx = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(score.shape)


def _prune_masked(model, calib, method: str, density: float) -> None:
    """The references: each expert weight masked (unstructured or 2:4) and run as dense Hare experts."""
    for name, module in experts_modules(model).items():
        dense = dense_experts(module)
        norms = calib.norms[name]
        pruned = []
        for w, n in ((dense.gate_up, norms[0]), (dense.down, norms[1])):
            score = w.abs() if method == "unstructured-magnitude" else w.abs() * n.to(w.device)[:, None, :]
            mask = _two_four_mask(score) if method == "2:4" else _row_topk_mask(score, density)
            pruned.append(w * mask)
        replace_module(model, name, HareExperts(*pruned, dense.activation, None, dense.gate_up_bias, dense.down_bias))


@torch.no_grad()
def _layer_rel_err(model, calib, dense_out) -> float:
    errs = []
    for name, module in experts_modules(model).items():
        out = module(*calib.inputs[name]).double()
        ref = dense_out[name]
        errs.append(relative_error(out, ref))
    return sum(errs) / len(errs)


def configurations(densities, bws, joint_panels: bool = True) -> list[dict]:
    """Every record's (method, density, bw, joint_panels): Block N:M methods x densities x bws, the joint-panel
    records (if ``joint_panels`` and bw 16 is among ``bws``), then the references."""
    configs = [{"method": m, "density": d, "bw": bw, "joint_panels": False}
               for bw in bws for d in densities for m in METHODS]
    if joint_panels and JOINT_BW in bws:
        configs += [{"method": m, "density": d, "bw": JOINT_BW, "joint_panels": True}
                    for d in densities for m in JOINT_METHODS]
    configs += [{"method": m, "density": d, "bw": None, "joint_panels": False} for d in densities
                for m in ("unstructured-magnitude", "unstructured-activation")]
    return configs + [{"method": "2:4", "density": 0.5, "bw": None, "joint_panels": False}]


@torch.no_grad()
def evaluate(model_dir, corpus_dir, *, densities=tuple(DENSITIES), bws=BLOCK_WIDTHS, calib_tokens: int = 65536,
             valid_tokens: int = 131072, device=None, log=print) -> dict:
    """The accuracy results (without timing) of the checkpoint in ``model_dir`` on ``corpus_dir``'s text."""
    from transformers import AutoModelForCausalLM

    from ..models.generation import load_tokenizer, perplexity
    from .trained_moe import encode

    bad = [d for d in densities if d not in DENSITIES]
    if bad or not densities:
        raise InvalidArgumentError(f"densities: expected some of {list(DENSITIES)}, got {list(densities)}")
    if not bws or any(bw not in BLOCK_WIDTHS for bw in bws):
        raise InvalidArgumentError(f"bws: expected some of {BLOCK_WIDTHS}, got {list(bws)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = Path(model_dir)
    info_path = model_dir / INFO
    train_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    tokenizer = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    window = min(512, base.config.max_position_embeddings)
    valid_ids = encode(tokenizer, read_split(corpus_dir, "valid"))[:valid_tokens]
    calib_ids = encode(tokenizer, read_split(corpus_dir, "calib"))[:calib_tokens]
    t0 = time.perf_counter()
    calib = calibrate(base, calib_ids, seq_len=window, keep_inputs=True, grams=True)
    dense_out = {n: m(*calib.inputs[n]).double() for n, m in experts_modules(base).items()}
    dense_ppl, scored = perplexity(patch(copy.deepcopy(base)), valid_ids, window)
    log(f"dense ppl {dense_ppl:.3f} on {scored} validation tokens; calibration on {calib.tokens} tokens "
        f"({time.perf_counter() - t0:.1f} s)")

    ffn = dense_experts(next(iter(experts_modules(base).values()))).down.shape[-1]
    if ffn % PANEL:
        log(f"no joint-panel records: they need ffn a multiple of {PANEL}, this model's is {ffn}")
    records = []
    for cfg in configurations(densities, bws, joint_panels=ffn % PANEL == 0):
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if cfg["bw"] is None:
            _prune_masked(model, calib, cfg["method"], cfg["density"])
        else:
            bn, bm = DENSITIES[cfg["density"]]
            patch(model, bn=bn, bm=bm, bw=cfg["bw"], score=None if cfg["method"] == "magnitude" else calib,
                  method=cfg["method"], joint_panels=cfg["joint_panels"])
        ppl, _ = perplexity(model, valid_ids, window)
        method = cfg["method"].removeprefix("unstructured-") if cfg["method"].startswith("unstructured") else None
        record = {"method": "unstructured" if method else cfg["method"], "density": cfg["density"], "bw": cfg["bw"],
                  "joint_panels": cfg["joint_panels"], "ppl": ppl, "layer_rel_err": _layer_rel_err(model, calib, dense_out)}
        if method:
            record["score"] = method
        records.append(record)
        log(f"{json.dumps(record)} ({time.perf_counter() - t0:.1f} s)")
        del model
    return {"model": train_info.get("name", model_dir.name), "corpus": train_info.get("corpus", str(corpus_dir)),
            "params": sum(p.numel() for p in base.parameters()), "train_tokens": train_info.get("train_tokens"),
            "dense_ppl": dense_ppl, "unigram_ppl": train_info.get("unigram_ppl"), **run_info(device), "eval": EVAL,
            "calib_tokens": calib.tokens, "valid_tokens": scored, "train": train_info, "records": records}


def time_layer(device=None, experts: int = 8, hidden: int = 4096, ffn: int = 14336, tokens: int = 8192,
               density: float = 0.25, bw: int = 16, seed: int = 0) -> dict:
    """Seconds for ``hare.reconstruct`` to prune one random MoE layer (gate/up (E, 2·ffn, hidden) and down
    (E, hidden, ffn), bf16 weights, Gram matrices of ``tokens`` random inputs per expert), on ``device``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(seed)
    bn, bm = DENSITIES[density]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = {"experts": experts, "hidden": hidden, "ffn": ffn, "calib_tokens_per_expert": tokens,
              "density": density, "bw": bw, "device": run_info(device)["gpu"]}
    total = 0.0
    for part, (out, inp) in {"gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}.items():
        w = (torch.randn(experts, out, inp, generator=gen, device=device) / inp**0.5).bfloat16()
        gram = torch.zeros(experts, inp, inp, device=device)
        for e in range(experts):
            x = torch.randn(tokens, inp, generator=gen, device=device)
            gram[e] = x.T @ x
        counts = torch.full((experts,), tokens, device=device)
        sync()
        t0 = time.perf_counter()
        sparse, _ = reconstruct(w, gram, bn=bn, bm=bm, bw=bw, counts=counts)
        sync()
        result[f"{part}_seconds"] = round(time.perf_counter() - t0, 3)
        total += result[f"{part}_seconds"]
        del w, gram, sparse
    result["layer_seconds"] = round(total, 3)
    return result


def _label(r: dict) -> str:
    if r["method"] == "unstructured":
        return f"unstructured ({r['score']})"
    return r["method"] if r["bw"] is None else f"{r['method']} bw{r['bw']}{' joint' if r['joint_panels'] else ''}"


def plot(result: dict, path) -> None:
    """Perplexity vs density per method (log scale), dense as a line."""
    import matplotlib.ticker

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in result["records"]:
        series.setdefault(_label(r), []).append((r["density"], r["ppl"]))
    colors = {"magnitude": "tab:blue", "activation": "tab:orange", "reconstruct": "tab:green", "2:4": "black"}
    styles = {16: "-", 32: "--", 64: ":"}
    for r in {_label(r): r for r in result["records"]}.values():
        pts = sorted(series[_label(r)])
        color = colors[r.get("score") or r["method"]]
        style = "-." if r["method"] == "unstructured" else styles.get(r["bw"], "")
        marker = "x" if r["bw"] is None else "s" if r["joint_panels"] else "o"
        ax.plot(*zip(*pts), style, color=color, marker=marker, label=_label(r),
                linewidth=1.2, markersize=4, alpha=0.6 if r["method"] == "unstructured" else 1.0)
    ax.axhline(result["dense_ppl"], color="black", linewidth=0.8, label=f"dense ({result['dense_ppl']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["density"] for r in result["records"]}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("density of the expert weights")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{result['model']}: pruning the experts ({result['gpu']})", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """Perplexity (layer error) per density and method, for the README."""
    densities = sorted({r["density"] for r in result["records"]}, reverse=True)
    labels = list(dict.fromkeys(_label(r) for r in result["records"]))
    cell = {(_label(r), r["density"]): f"{r['ppl']:.2f} ({r['layer_rel_err']:.3f})" for r in result["records"]}
    lines = [f"| method \\ density | {' | '.join(f'{d:.0%}' for d in densities)} |",
             "|---|" + "---:|" * len(densities)]
    lines += [f"| {label} | {' | '.join(cell.get((label, d), '') for d in densities)} |" for label in labels]
    return "\n".join(lines) + "\n"


def write(result: dict, out_json) -> None:
    """The JSON, the plot (.png) and the markdown table (.md) beside it."""
    out_json = save_results(result, out_json)
    plot(result, out_json.with_suffix(".png"))
    out_json.with_suffix(".md").write_text(markdown_table(result))
