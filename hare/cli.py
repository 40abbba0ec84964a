"""The ``hare`` command line."""

from __future__ import annotations

import json
import os
import sys
import warnings
from importlib.metadata import version as package_version
from pathlib import Path

import typer
from typer.core import TyperGroup

from .errors import HareError, InvalidArgumentError

if "COLUMNS" not in os.environ and not sys.stdout.isatty():
    os.environ["COLUMNS"] = "100"  # help and tables off a terminal: 100 columns (rich would cut them at 80)


def _one_line(text) -> str:
    return " ".join(str(text).split())


class _Commands(TyperGroup):
    """Every command's failures as one line on stderr: Hare's errors and the predictable ones (files, encodings)
    as ``error: …`` with exit status 2, anything else with how to see its traceback (``hare --debug``) and status
    1; warnings as ``warning: …``."""

    def invoke(self, ctx: typer.Context):
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_: typer.echo(f"warning: {_one_line(message)}", err=True)
            try:
                return super().invoke(ctx)
            except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors, exits: typer reports them
                raise
            except Exception as e:  # noqa: BLE001 - reported as one line unless --debug asks for the traceback
                if (ctx.obj or {}).get("debug"):
                    raise
                if isinstance(e, (HareError, OSError, UnicodeError)):
                    typer.echo(f"error: {_one_line(e)}", err=True)
                    raise typer.Exit(2) from None
                typer.echo(f"error: unexpected {type(e).__name__}: {_one_line(e)} (`hare --debug "
                           f"{ctx.invoked_subcommand or ''} …` shows the traceback)", err=True)
                raise typer.Exit(1) from None


app = typer.Typer(cls=_Commands, help="Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs.",
                  no_args_is_help=True, add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


def _print_version(value: bool):
    if value:
        typer.echo(f"hare {package_version('hare')} (torch {package_version('torch')}, "
                   f"transformers {package_version('transformers')})")
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error"),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print Hare's version and exit")):
    """Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs."""
    ctx.obj = {"debug": debug}


@app.command()
def demo(tokens: int = typer.Option(512, min=1, help="tokens to route through the layer"),
         device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)"),
         seed: int = typer.Option(0, help="random seed"),
         model: bool = typer.Option(True, help="also run a small transformers MoE model patched dense and pruned"),
         small: bool = typer.Option(False, help="a smaller layer and model (seconds on a CPU)")):
    """A small MoE layer at Block 1:1/1:2/1:5/1:10 (nominal 50/25/10/5%) vs dense; then a small model end to end."""
    from .demo import run_demo, run_model_demo

    size = "small" if small else "full"
    run_demo(tokens=tokens, device=device, seed=seed, size=size)
    if model:
        run_model_demo(device=device, seed=seed, size=size)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _device(device: str | None):
    """The torch device asked for, checked before any model loads (default: cuda if present, else cpu)."""
    from .models.hare_folder import resolve_device

    return resolve_device(device or ("cuda" if torch_cuda_available() else "cpu"))


@app.command()
def sparsify(model_dir: Path = typer.Argument(..., help="transformers checkpoint folder (config + safetensors)"),
             out_dir: Path = typer.Argument(..., help="new folder for the Hare checkpoint"),
             density: float = typer.Option(0.25, help="0.5, 0.25, 0.1 or 0.05 (Block 1:1, 1:2, 1:5, 1:10 with 2:4)"),
             bw: int = typer.Option(16, help="block width: 16, 32 or 64 columns"),
             calib: Path = typer.Option(None, exists=True, dir_okay=False, help="calibration text file (UTF-8)"),
             calib_tokens: int = typer.Option(512, min=2, help="calibration tokens used from the text"),
             method: str = typer.Option(None, help="magnitude, activation (|w|·‖x‖) or reconstruct (SparseGPT-style, "
                                        "kept weights updated); default: activation with --calib, else magnitude"),
             device: str = typer.Option(None, help="where to load and prune the model (default: cpu)"),
             joint_panels: bool = typer.Option(None, "--joint-panels/--no-joint-panels",
                                               help="paired panels keep the same blocks: gate panel m with up panel "
                                               "m (needs ffn % 16 == 0), down panels 2m with 2m+1; default: "
                                               "wherever the ffn admits them")):
    """Prune the experts of a MoE checkpoint to Block N:M and write a Hare checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from .models.hare_folder import sparsify_checkpoint

    text = _read_text(calib, "--calib") if calib else None
    reports = sparsify_checkpoint(model_dir, out_dir, density, bw=bw, calib_text=text, calib_tokens=calib_tokens,
                                  device=device, method=method, joint_panels=joint_panels)
    source = (f"calibration text {calib.name} ({method or 'activation'})" if calib
              else "random token ids (no --calib: magnitude pruning)")
    table = Table(title=f"{out_dir}: experts at {density:.0%} density; relative output error on {source}")
    for col in ("layer", "rel. error", "bytes vs dense"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in reports:
        table.add_row(r.name, f"{r.rel_error:.4f}", f"{r.sparse_bytes / r.dense_bytes:.3f}")
    Console().print(table)


@app.command()
def generate(model_dir: Path = typer.Argument(..., help="transformers or Hare checkpoint folder"),
             prompt: str = typer.Option(..., help="text to continue"),
             max_new_tokens: int = typer.Option(32, min=1),
             device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)"),
             cuda_graphs: bool = typer.Option(True, help="on CUDA, decode with a static cache and CUDA graphs")):
    """Continue a prompt greedily with a dense or Hare checkpoint (tokenizer from the folder)."""
    from transformers import TextStreamer

    from .models.hare_folder import load_model, read_config
    from .models.generation import generate as run_generate, load_tokenizer

    dev = _device(device)
    read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if not tokenizer(prompt).input_ids:
        raise InvalidArgumentError("--prompt: it encodes to no tokens")
    model = load_model(model_dir, device=dev)
    typer.echo(prompt, nl=False)
    run_generate(model, tokenizer, prompt, max_new_tokens, cuda_graphs,
                 streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))


@app.command(name="eval")
def evaluate(model_dir: Path = typer.Argument(..., help="transformers or Hare checkpoint folder"),
             text: Path = typer.Option(..., exists=True, dir_okay=False, help="UTF-8 text file to score"),
             window: int = typer.Option(None, min=2, help="tokens per scored window (default: 512, or the model's "
                                        "max_position_embeddings if fewer)"),
             device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)")):
    """Perplexity of a dense or Hare checkpoint on a text file."""
    from .models.hare_folder import load_model, read_config
    from .models.generation import check_window, default_window, load_tokenizer, perplexity

    dev = _device(device)
    config = read_config(model_dir)
    window = default_window(config) if window is None else window
    check_window(config, window)
    ids = load_tokenizer(model_dir)(_read_text(text, "--text"), return_tensors="pt").input_ids[0]
    if ids.numel() < 2:
        raise InvalidArgumentError(f"--text {text}: {ids.numel()} token(s); at least 2 are needed to score")
    model = load_model(model_dir, device=dev)
    ppl, count = perplexity(model, ids, window, progress=True)
    typer.echo(f"perplexity {ppl:.4f} over {count} tokens ({model_dir})")


@app.command()
def info(model_dir: Path = typer.Argument(None, help="also say which path each MoE layer of this checkpoint takes"),
         device: str = typer.Option(None, help="device for MODEL_DIR: cuda or cpu (default: cuda if present)")):
    """torch, CUDA, GPUs, nvcc, kernel cache; with MODEL_DIR, the path each of its MoE layers takes here.

    The path is the Hopper kernels, PyTorch's grouped GEMM or the reference path, with the reason."""
    from rich.console import Console
    from rich.table import Table

    from .info import environment, layer_paths

    dev = _device(device) if model_dir is not None else None
    console = Console()
    table = Table(title="Hare on this machine", show_header=False)
    for item, state in environment():
        table.add_row(item, state)
    console.print(table)
    if model_dir is not None:
        from .models.hare_folder import load_model

        layers = Table(title=f"{model_dir} on {dev}")
        for col in ("layer", "weights", "path", "why not the Hopper kernels"):
            layers.add_column(col)
        for row in layer_paths(load_model(model_dir, device=dev)):
            layers.add_row(*row)
        console.print(layers)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


bench_app = typer.Typer(help="Benchmarks (GPU).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command(name="model")
def bench_model(models: str = typer.Option("all", help="comma-separated names from hare.models.configs.REAL, or all"),
                out_json: Path = typer.Option(None, help="default: bench/results/model_<gpu>.json"),
                layers: int = typer.Option(None, min=1, help="decoder layers per model (default: as many as fit)"),
                quick: bool = typer.Option(False, help="2 layers per model (a smoke run)"),
                attention: str = typer.Option("hare", help="comma-separated: sdpa (transformers' own), hare "
                                              "(decode over the KV cache as stored); every variant alike"),
                batches: str = typer.Option("1,8,32,128", help="comma-separated decode batch sizes"),
                densities: str = typer.Option("0.5,0.25,0.1", help="comma-separated Block N:M densities"),
                prefill_tokens: int = typer.Option(4096, min=0, help="prompt of the prefill case (0: no prefill)")):
    """End-to-end prefill/decode of real-shaped MoE models: transformers' experts, grouped_mm, Hare dense/sparse."""
    from .bench.model import main as bench_main

    bench_main(models=models, out_json=out_json, quick=quick, layers=layers,
               attentions=_csv(attention, str, "attention"), prefill_tokens=prefill_tokens,
               batches=_csv(batches, int, "batches"), densities=_csv(densities, float, "densities"))


def _csv(text: str, kind, what: str) -> tuple:
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise InvalidArgumentError(f"{what}: {text!r} is not a comma-separated list of {kind.__name__}") from None


@bench_app.command(name="model-combine")
def bench_model_combine(parts: list[Path] = typer.Argument(..., help="results files of `hare bench model`"),
                        out_json: Path = typer.Option(..., help="the combined results file (a plot beside it)")):
    """Combine runs of `hare bench model` of one commit and GPU that timed different models into one file."""
    from .bench.common import save_results
    from .bench.model import merge_results, plot

    try:
        results = [json.loads(p.read_text()) for p in parts]
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot read a results file: {e}") from None
    result = merge_results(results)
    save_results(result, out_json)
    plot(result, out_json.with_suffix(".png"))
    typer.echo(f"{len(result['records'])} records -> {out_json}")


@bench_app.command(name="kernels", add_help_option=False,
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_kernels(ctx: typer.Context):
    """Fused MoE kernels vs grouped_mm, a cuBLAS loop and a padded layout on six model shapes (GPU).

    Options go to hare.bench.kernels: --shapes, --tokens, --routing, --out-json, --plot-dir, --log; --density and
    --bw time the Block N:M kernels, --suite real synthetic the Hare paper's settings, --suite gpt-oss GPT-OSS-20B's
    biased clamped-SwiGLU experts through hare.moe, dense and Block N:M (--help lists them)."""
    from .bench.kernels import build_parser, main as kernels_main

    build_parser().parse_args(ctx.args)  # --help and bad options are answered here, on any machine
    if not torch_cuda_available():
        raise HareError("hare bench kernels needs a CUDA GPU (sm_90: H100/H200)")
    kernels_main(ctx.args)


@bench_app.command(name="overhead")
def bench_overhead(tokens: str = typer.Option("1,16,64,128", help="comma-separated token counts"),
                   densities: str = typer.Option("1.0,0.25", help="comma-separated: 1.0 dense, Block N:M densities"),
                   out_json: Path = typer.Option(None, help="default: bench/results/overhead_<gpu>.json")):
    """Eager hare.moe host and wall time per call beside its CUDA-graph replay, check_ids on and off (GPU)."""
    from .bench import overhead

    tokens_, densities_ = _csv(tokens, int, "tokens"), _csv(densities, float, "densities")
    if any(t < 1 for t in tokens_) or any(d != 1.0 and d not in overhead.RATIOS for d in densities_):
        raise InvalidArgumentError(f"tokens must be >= 1 and densities 1.0 or one of {sorted(overhead.RATIOS)}")
    if not torch_cuda_available():
        raise HareError("hare bench overhead needs a CUDA GPU (sm_90: H100/H200)")
    overhead.run(tokens=tokens_, densities=densities_, out_json=out_json or overhead.default_out_json())


@bench_app.command(name="ep")
def bench_ep(gpus: int = typer.Option(None, min=1, help="processes, one per GPU (default: all GPUs)"),
             out_json: Path = typer.Option(None, help="default on GPUs: bench/results/ep_<gpu>x<N>.json"),
             tokens: str = typer.Option(None, help="tokens per rank, comma-separated (default: 1,128,4096)"),
             shapes: str = typer.Option(None, help="comma-separated, from hare.bench.ep.SHAPES ('small' for a smoke "
                                        "run; default: mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite)"),
             densities: str = typer.Option(None, help="comma-separated: 1.0 (dense) or Block N:M densities of "
                                           "hare.blocknm.DENSITIES, bw 16 (default: 1.0,0.25)"),
             iters: int = typer.Option(10, min=1),
             cpu: bool = typer.Option(False, help="gloo processes on the CPU instead of GPUs (a smoke run)")):
    """Expert-parallel MoE step on several GPUs: dispatch, local experts and combine times (torchrun)."""
    import subprocess

    import torch

    from .bench.ep import parse_options

    parse_options(shapes, tokens, densities)  # a bad option fails here, not in every rank's process
    available = torch.cuda.device_count()
    procs = gpus or (2 if cpu else available)
    if not cpu and (available < 2 or procs > available):
        raise HareError(f"bench ep needs at least 2 GPUs and at most the {available} present; asked for {procs} "
                        "(use --cpu for a gloo run on the CPU)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "hare.bench.ep", "--iters", str(iters)]
    for option, value in (("--tokens", tokens), ("--shapes", shapes), ("--densities", densities),
                          ("--out-json", out_json)):
        if value is not None:
            cmd += [option, str(value)]
    env = None if not cpu else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    raise typer.Exit(subprocess.run(cmd, env=env).returncode)


@bench_app.command(name="train-moe")
def bench_train_moe(corpus: Path = typer.Argument(..., help="corpus folder (scripts/fetch_corpus.sh makes .corpus)"),
                    out_dir: Path = typer.Argument(..., help="folder for the trained transformers checkpoint"),
                    size: str = typer.Option("small", help="small (~55M parameters) or toy (a CPU smoke run)"),
                    seed: int = typer.Option(0, help="seeds the initialisation and the batches"),
                    steps: int = typer.Option(None, min=1, help="optimizer steps (default: the size's epochs)"),
                    max_seconds: float = typer.Option(300.0, min=1, help="stop training after this long"),
                    device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)")):
    """Train the small Mixtral-style MoE that `hare bench accuracy` measures (tokenizer included)."""
    from .bench.trained_moe import train

    train(corpus, out_dir, size=size, seed=seed, steps=steps, max_seconds=max_seconds, device=device)


@bench_app.command(name="accuracy")
def bench_accuracy(model_dir: Path = typer.Argument(..., help="trained checkpoint (`hare bench train-moe`)"),
                   corpus: Path = typer.Option(..., help="corpus folder: calib.txt and valid.txt are used"),
                   out_json: Path = typer.Option(None, help="default: bench/results/accuracy_<name>.json; a .png "
                                                 "plot and a .md table are written beside it"),
                   name: str = typer.Option(None, help="results name (default: the model's)"),
                   densities: str = typer.Option("0.5,0.25,0.1,0.05", help="comma-separated"),
                   bws: str = typer.Option("16,32,64", help="comma-separated block widths"),
                   calib_tokens: int = typer.Option(65536, min=2, help="calibration tokens (from calib.txt)"),
                   valid_tokens: int = typer.Option(131072, min=2, help="validation tokens scored (valid.txt)"),
                   time_layer: str = typer.Option("mixtral", help="time the reconstruct pruner on a random layer: "
                                                  "mixtral (8 x 14336 x 4096), toy, or none"),
                   device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)")):
    """Perplexity and layer error of a trained MoE pruned at each density, method and block width."""
    from .bench import accuracy

    result = accuracy.evaluate(model_dir, corpus, densities=_csv(densities, float, "densities"),
                               bws=_csv(bws, int, "bws"), calib_tokens=calib_tokens, valid_tokens=valid_tokens,
                               device=device)
    layers = {"mixtral": {}, "toy": dict(experts=2, hidden=128, ffn=256, tokens=512)}
    if time_layer not in (*layers, "none"):
        raise InvalidArgumentError(f"--time-layer: expected mixtral, toy or none, got {time_layer!r}")
    if time_layer != "none":
        result["reconstruct_timing"] = accuracy.time_layer(device, **layers[time_layer])
        typer.echo(json.dumps(result["reconstruct_timing"]))
    out_json = out_json or Path("bench/results") / f"accuracy_{name or result['model']}.json"
    accuracy.write(result, out_json)
    typer.echo(accuracy.markdown_table(result))
    typer.echo(f"{len(result['records'])} records -> {out_json} (+ .png, .md)")


if __name__ == "__main__":
    app()
