"""The ``hare`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import HareError, InvalidArgumentError

app = typer.Typer(help="Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def main():
    """Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs."""


@app.command()
def demo(tokens: int = typer.Option(512, min=1, help="tokens to route through the layer"),
         device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)"),
         seed: int = typer.Option(0, help="random seed"),
         model: bool = typer.Option(True, help="also run a small transformers MoE model patched dense and pruned")):
    """Sparsify a small MoE layer at 50/25/10/5% and compare with dense; then a small MoE model end to end."""
    from .demo import run_demo, run_model_demo

    run_demo(tokens=tokens, device=device, seed=seed)
    if model:
        run_model_demo(device=device, seed=seed)


def _fail(error: Exception):
    """Print a Hare error (bad input, foreign folder) as one line and exit with status 2."""
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


@app.command()
def sparsify(model_dir: Path = typer.Argument(..., help="transformers checkpoint folder (config + safetensors)"),
             out_dir: Path = typer.Argument(..., help="new folder for the Hare checkpoint"),
             density: float = typer.Option(0.25, help="0.5, 0.25, 0.1 or 0.05 (Block 1:1, 1:2, 1:5, 1:10 with 2:4)"),
             bw: int = typer.Option(16, help="block width: 16, 32 or 64 columns"),
             calib: Path = typer.Option(None, exists=True, dir_okay=False, help="calibration text file (UTF-8)"),
             calib_tokens: int = typer.Option(512, min=2, help="calibration tokens used from the text"),
             device: str = typer.Option(None, help="where to load and prune the model (default: cpu)")):
    """Prune the experts of a MoE checkpoint to Block N:M and write a Hare checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from .models.checkpoint import sparsify_checkpoint

    text = calib.read_text(encoding="utf-8") if calib else None
    try:
        reports = sparsify_checkpoint(model_dir, out_dir, density, bw=bw, calib_text=text, calib_tokens=calib_tokens,
                                      device=device)
    except HareError as e:
        _fail(e)
    source = f"calibration text {calib.name}" if calib else "random token ids (no --calib: magnitude pruning)"
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
    from .models.checkpoint import load_model
    from .models.generation import generate as run_generate, load_tokenizer

    dev = device or ("cuda" if torch_cuda_available() else "cpu")
    try:
        model = load_model(model_dir, device=dev)
        text, _ = run_generate(model, load_tokenizer(model_dir), prompt, max_new_tokens, cuda_graphs)
    except HareError as e:
        _fail(e)
    typer.echo(prompt + text)


@app.command(name="eval")
def evaluate(model_dir: Path = typer.Argument(..., help="transformers or Hare checkpoint folder"),
             text: Path = typer.Option(..., exists=True, dir_okay=False, help="UTF-8 text file to score"),
             window: int = typer.Option(512, min=2, help="tokens per scored window"),
             device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)")):
    """Perplexity of a dense or Hare checkpoint on a text file."""
    from .models.checkpoint import load_model
    from .models.generation import load_tokenizer, perplexity

    dev = device or ("cuda" if torch_cuda_available() else "cpu")
    try:
        model = load_model(model_dir, device=dev)
        ids = load_tokenizer(model_dir)(text.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        ppl, count = perplexity(model, ids, window)
    except HareError as e:
        _fail(e)
    typer.echo(f"perplexity {ppl:.4f} over {count} tokens ({model_dir})")


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

    try:
        bench_main(models=models, out_json=out_json, quick=quick, layers=layers,
                   attentions=_csv(attention, str, "attention"), prefill_tokens=prefill_tokens,
                   batches=_csv(batches, int, "batches"), densities=_csv(densities, float, "densities"))
    except HareError as e:
        _fail(e)


def _csv(text: str, kind, what: str) -> tuple:
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise InvalidArgumentError(f"{what}: {text!r} is not a comma-separated list of {kind.__name__}") from None


@bench_app.command(name="model-combine")
def bench_model_combine(parts: list[Path] = typer.Argument(..., help="results files of `hare bench model`"),
                        out_json: Path = typer.Option(..., help="the combined results file (a plot beside it)")):
    """Combine runs of `hare bench model` of one commit and GPU that timed different models into one file."""
    from .bench.model import combine, plot

    try:
        results = [json.loads(p.read_text()) for p in parts]
    except (OSError, ValueError) as e:
        _fail(InvalidArgumentError(f"cannot read a results file: {e}"))
    try:
        result = combine(results)
    except HareError as e:
        _fail(e)
    out_json.write_text(json.dumps(result, indent=1))
    plot(result, out_json.with_suffix(".png"))
    typer.echo(f"{len(result['records'])} records -> {out_json}")


@bench_app.command(name="kernels", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_kernels(ctx: typer.Context):
    """Fused MoE kernels vs grouped_mm, a cuBLAS loop and a padded layout on six model shapes (GPU).

    Options go to hare.bench.kernels: --shapes, --tokens, --routing, --out-json, --plot-dir, --log; --density and
    --bw time the Block N:M kernels, --suite real synthetic the Hare paper's settings (see --help)."""
    from .bench.kernels import main as kernels_main

    if not torch_cuda_available():
        _fail(HareError("hare bench kernels needs a CUDA GPU (sm_90: H100/H200)"))
    kernels_main(ctx.args)


@bench_app.command(name="ep")
def bench_ep(gpus: int = typer.Option(None, min=1, help="processes, one per GPU (default: all GPUs)"),
             out_json: Path = typer.Option(None, help="JSON records, e.g. bench/results/ep_<gpu>.json"),
             tokens: str = typer.Option("16,256,4096", help="tokens per rank, comma-separated"),
             shapes: str = typer.Option("mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite",
                                        help="comma-separated, from hare.bench.ep.SHAPES ('small' for a smoke run)"),
             iters: int = typer.Option(10, min=1),
             cpu: bool = typer.Option(False, help="gloo processes on the CPU instead of GPUs (a smoke run)")):
    """Expert-parallel MoE step on several GPUs: dispatch, local experts and combine times (torchrun)."""
    import subprocess
    import sys

    import torch

    available = torch.cuda.device_count()
    procs = gpus or (2 if cpu else available)
    if not cpu and (available < 2 or procs > available):
        _fail(HareError(f"bench ep needs at least 2 GPUs and at most the {available} present; asked for {procs} "
                        "(use --cpu for a gloo run on the CPU)"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "hare.bench.ep", "--tokens", tokens, "--shapes", shapes, "--iters", str(iters)]
    if out_json:
        cmd += ["--out-json", str(out_json)]
    env = None if not cpu else {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    raise typer.Exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    app()
