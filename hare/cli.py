"""The ``hare`` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def main():
    """Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs."""


@app.command()
def demo(tokens: int = typer.Option(512, min=1, help="tokens to route through the layer"),
         device: str = typer.Option(None, help="cuda or cpu (default: cuda if present)"),
         seed: int = typer.Option(0, help="random seed")):
    """Sparsify a small MoE layer at 50/25/10/5% and compare bytes, output error and time with dense."""
    from .demo import run_demo

    run_demo(tokens=tokens, device=device, seed=seed)


if __name__ == "__main__":
    app()
