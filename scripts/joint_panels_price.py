"""The accuracy price of joint panels on the CPU: layer-output relative error of activation-aware Block N:M pruning,
each panel choosing alone vs paired (gate/up ``joint="halves"``, down ``joint="adjacent"``), at 50/25/10/5%, in the
panel layouts ``hare.patch`` uses (``hare.blocknm.expert_layout``: gate/up in the halves layout).

Calibration-like data: expert weights with Student-t (df 3) entries and per-row scales, inputs with Student-t
entries and log-normal per-column scales (a few outlier channels, as in trained models). Per expert, the scores
are |w|·‖x_col‖ from the expert's own tokens; the errors are measured on those tokens: gate/up output, down
output (on the dense hidden activations) and the whole expert (silu(gate)·up, then down).

    .venv/bin/python scripts/joint_panels_price.py            # prints the markdown table of notes/joint_panels.md
"""

from __future__ import annotations

import argparse

import torch

import hare
from hare.blocknm import DENSITIES
from hare.calibration import activation_score
from hare.metrics import relative_error
from hare.blocknm import expert_layout


def heavy(shape, gen, df: int = 3) -> torch.Tensor:
    """Student-t entries (df degrees of freedom), unit scale."""
    normal = torch.randn(shape, generator=gen, dtype=torch.float64)
    chi2 = torch.randn((df, *shape), generator=gen, dtype=torch.float64).square().sum(0)
    return normal / (chi2 / df).sqrt()


def layer(experts: int, hidden: int, ffn: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w_gate_up = heavy((experts, 2 * ffn, hidden), gen) * torch.rand(experts, 2 * ffn, 1, generator=gen,
                                                                     dtype=torch.float64).add(0.5) / hidden**0.5
    w_down = heavy((experts, hidden, ffn), gen) * torch.rand(experts, hidden, 1, generator=gen,
                                                             dtype=torch.float64).add(0.5) / ffn**0.5
    col_scale = torch.exp(1.0 * torch.randn(hidden, generator=gen, dtype=torch.float64))
    x = heavy((experts, tokens, hidden), gen) * col_scale
    return w_gate_up, w_down, x


def measure(experts=4, hidden=512, ffn=512, tokens=1024, seed=0) -> list[dict]:
    w_gate_up, w_down, x = layer(experts, hidden, ffn, tokens, seed)
    g_u = x @ w_gate_up.transpose(1, 2)
    h = torch.nn.functional.silu(g_u[..., :ffn]) * g_u[..., ffn:]
    y = h @ w_down.transpose(1, 2)
    scores = {"gate_up": activation_score(w_gate_up, x.norm(dim=1)), "down": activation_score(w_down, h.norm(dim=1))}
    rows = []
    for density, (bn, bm) in DENSITIES.items():
        row = {"density": density}
        for joint_panels in (False, True):
            pruned = {part: hare.sparsify(w, bn=bn, bm=bm, bw=16, score=scores[part], dtype=torch.float64,
                                          **expert_layout(part, w.shape[-2], joint_panels)).to_dense()
                      for part, w in (("gate_up", w_gate_up), ("down", w_down))}
            g_u_p = x @ pruned["gate_up"].transpose(1, 2)
            h_p = torch.nn.functional.silu(g_u_p[..., :ffn]) * g_u_p[..., ffn:]
            tag = "joint" if joint_panels else "alone"
            row[f"gate_up_{tag}"] = relative_error(g_u_p, g_u)
            row[f"down_{tag}"] = relative_error(h @ pruned["down"].transpose(1, 2), y)
            row[f"expert_{tag}"] = relative_error(h_p @ pruned["down"].transpose(1, 2), y)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| density | gate/up alone | gate/up joint | down alone | down joint | expert alone | expert joint "
             "| expert joint / alone |", "|---|" + "---:|" * 7]
    for r in rows:
        cells = [f"{r[f'{p}_{t}']:.4f}" for p in ("gate_up", "down", "expert") for t in ("alone", "joint")]
        lines.append(f"| {r['density']:.0%} | {' | '.join(cells)} | {r['expert_joint'] / r['expert_alone']:.3f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(table(measure(args.experts, args.hidden, args.ffn, args.tokens, args.seed)))


if __name__ == "__main__":
    main()
