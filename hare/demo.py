"""``hare demo``: a small MoE layer sparsified at Block 1:1/1:2/1:5/1:10 (nominal 50/25/10/5%), run dense and sparse, compared in one table; then
a small transformers MoE model, patched dense and pruned, generating text (bytes, speed, agreement with dense)."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from .bench.toolkit import median_ms
from .blocknm import DENSITIES, sparsify
from .calibration import activation_score, expert_input_norms
from .metrics import relative_error
from .moe import backend, moe

RATIOS = tuple(DENSITIES.values())
# the layer and the model of each demo size; "small" runs in seconds on a CPU (the CLI test uses it)
LAYER_SIZES = {"full": dict(experts=8, top_k=2, hidden=256, ffn=512),
               "small": dict(experts=4, top_k=2, hidden=128, ffn=256)}
MODEL_SIZES = {"full": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_experts=16,
                            num_experts_per_tok=4, head_dim=32),
               "small": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                             num_experts_per_tok=2, head_dim=16)}


def synthetic_weight(shape, generator: torch.Generator) -> torch.Tensor:
    """Stacked expert weights (E, out, in) with the spread of trained ones: a heavy-tailed entry distribution and
    input channels of unequal scale (log-normal), so that which weights matter is not uniform."""
    w = torch.randn(*shape, generator=generator)
    heavy = torch.randn(*shape, generator=generator) * (torch.rand(*shape, generator=generator) < 0.02) * 4
    col_scale = torch.exp(0.5 * torch.randn(shape[0], 1, shape[2], generator=generator))
    return (w + heavy) * col_scale / shape[2] ** 0.5


def synthetic_layer(experts: int, hidden: int, ffn: int, generator: torch.Generator):
    """Random expert weights (``synthetic_weight``) and a router."""
    gate_up, down = synthetic_weight((experts, 2 * ffn, hidden), generator), synthetic_weight((experts, hidden, ffn), generator)
    router = torch.randn(hidden, experts, generator=generator) / hidden ** 0.5
    return gate_up, down, router


def channel_scales(hidden: int, generator: torch.Generator) -> torch.Tensor:
    """Per-channel scale of the layer's input: a few outlier channels, as in real LLM hidden states."""
    scale = torch.ones(hidden)
    scale[torch.randperm(hidden, generator=generator)[: max(1, hidden // 64)]] = 8.0
    return scale


def synthetic_tokens(tokens: int, scale: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tokens, scale.numel(), generator=generator) * scale


def top_k_route(x: torch.Tensor, router: torch.Tensor, k: int):
    probs = torch.softmax(x.float() @ router.float(), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(x.dtype)


def stored_density(weights) -> float:
    """Fraction of the entries of these BlockNM weights that are kept, as stored (the nominal bn/(2·bm) or more,
    where a row's last window of blocks is partial)."""
    return sum(w.density * w.shape.numel() for w in weights) / sum(w.shape.numel() for w in weights)


def run_demo(tokens: int = 512, device: str | None = None, seed: int = 0, console: Console | None = None,
             size: str = "full") -> list[dict]:
    """The layer of ``LAYER_SIZES[size]`` dense and at every ratio, magnitude- and activation-aware-pruned: one row
    each (stored density, bytes, error against dense, time)."""
    experts, top_k, hidden, ffn = (LAYER_SIZES[size][key] for key in ("experts", "top_k", "hidden", "ffn"))
    console = console or Console()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    w_gate_up, w_down, router = synthetic_layer(experts, hidden, ffn, gen)
    scale = channel_scales(hidden, gen)
    calib = synthetic_tokens(tokens, scale, gen)
    x = synthetic_tokens(tokens, scale, gen)
    calib_ids, _ = top_k_route(calib, router, top_k)
    norms_in, norms_hidden = expert_input_norms(calib, calib_ids, w_gate_up)
    scores = {"magnitude": (None, None),
              "activation-aware": (activation_score(w_gate_up, norms_in), activation_score(w_down, norms_hidden))}

    ids, weights = top_k_route(x, router, top_k)
    args = [t.to(dev) for t in (x.to(dtype), ids, weights.to(dtype))]
    dense = (w_gate_up.to(dev, dtype), w_down.to(dev, dtype))
    ref = moe(*args, *dense)
    dense_ms = median_ms(lambda: moe(*args, *dense), dev, warmup=1)
    dense_bytes = sum(w.numel() * 2 for w in dense)  # bf16, what a GPU would hold

    rows = [dict(weights="dense", criterion="-", density=1.0, bytes_ratio=1.0, rel_error=0.0, ms=dense_ms)]
    for bn, bm in RATIOS:
        for criterion, (score_gu, score_d) in scores.items():
            sparse = [sparsify(w, bn=bn, bm=bm, score=s).to(dev)
                      for w, s in ((w_gate_up, score_gu), (w_down, score_d))]
            out = moe(*args, *sparse)
            err = relative_error(out, ref)
            rows.append(dict(weights=f"{bn}:{bm} bw16", criterion=criterion, density=stored_density(sparse),
                             bytes_ratio=sum(s.nbytes for s in sparse) / dense_bytes, rel_error=err,
                             ms=median_ms(lambda: moe(*args, *sparse), dev, warmup=1)))

    table = Table(title=f"Hare demo: {experts} experts, top-{top_k}, hidden {hidden}, ffn {ffn}, "
                        f"{tokens} tokens on {dev.type}")
    for col in ("weights", "criterion", "density", "bytes vs dense", "rel. error vs dense", "time (ms)"):
        table.add_column(col, justify="left" if col in ("weights", "criterion") else "right")
    for r in rows:
        table.add_row(r["weights"], r["criterion"], f"{r['density']:.1%}", f"{r['bytes_ratio']:.3f}",
                      f"{r['rel_error']:.3f}", f"{r['ms']:.2f}")
    console.print(table)
    console.print("density: entries kept, as stored (above bn/(2·bm) where a row's last window is partial); "
                  "bytes: values + 2:4 metadata + block indices over bf16 dense; error: ‖out − dense‖ / ‖dense‖ on "
                  "held-out tokens; activation-aware scores |w|·‖x_col‖ come from separate calibration tokens. "
                  f"Paths: dense on {backend(args[0], *dense)[0]}, Block N:M on {backend(args[0], *sparse)[0]}"
                  + ("" if backend(args[0], *sparse)[0] == "hopper" else
                     " (which expands the weights to dense, so sparse times there are not the speed story)") + ".")
    return rows


def run_model_demo(model_type: str = "qwen3_moe", new_tokens: int = 8, device: str | None = None, seed: int = 0,
                   console: Console | None = None, size: str = "full") -> list[dict]:
    """A random small ``model_type`` model (``MODEL_SIZES[size]``): transformers' experts, Hare dense, Hare at
    50/25/10% (activation-aware from calibration tokens). Agreement: greedy tokens equal to transformers' and logits
    error on held-out tokens."""
    from .models import HareExperts, calibrate, experts_modules, patch
    from .models.configs import tiny_model

    console = console or Console()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = MODEL_SIZES[size]
    gen = torch.Generator().manual_seed(seed)

    def make():
        """The same model every call; its expert weights drawn like trained ones (``synthetic_weight``)."""
        model = tiny_model(model_type, seed, **overrides)
        weights = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in experts_modules(model).values():
                for p in (module.gate_up_proj, module.down_proj):
                    p.copy_(synthetic_weight(tuple(p.shape), weights))
        return model.to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    vocab = make().config.vocab_size
    calib_ids = torch.randint(4, vocab, (256,), generator=gen)
    held_out = torch.randint(4, vocab, (1, 64), generator=gen).to(dev)
    prompt = torch.randint(4, vocab, (1, 8), generator=gen).to(dev)

    def expert_bytes(model):
        return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".experts." in n)

    def run(model):
        with torch.no_grad():
            logits = model(held_out).logits
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            ms = median_ms(lambda: model(held_out), dev, warmup=1, reps=3)
        return logits, out[0, prompt.shape[1]:], ms

    base = make()
    ref_logits, ref_tokens, ref_ms = run(base)
    dense_bytes = expert_bytes(base)
    rows = [dict(model="transformers", density=1.0, bytes_ratio=1.0, logits_error=0.0, agreement=1.0, ms=ref_ms,
                 tokens=ref_tokens.tolist())]
    variants = [("hare dense", None)] + [(f"hare {bn}:{bm}", (bn, bm)) for bn, bm in RATIOS[:3]]
    for label, ratio in variants:
        model = make()
        if ratio is None:
            patch(model)
        else:
            patch(model, bn=ratio[0], bm=ratio[1], score=calibrate(model, calib_ids))
        experts = [m for m in model.modules() if isinstance(m, HareExperts)]
        density = 1.0 if ratio is None else stored_density([m.weight(n) for m in experts for n in ("gate_up", "down")])
        logits, tokens, ms = run(model)
        err = relative_error(logits, ref_logits)
        rows.append(dict(model=label, density=density, bytes_ratio=expert_bytes(model) / dense_bytes,
                         logits_error=err, agreement=(tokens == ref_tokens).float().mean().item(), ms=ms,
                         tokens=tokens.tolist()))

    cfg = base.config
    table = Table(title=f"Hare demo, end to end: random {model_type} ({cfg.num_hidden_layers} layers, "
                        f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, hidden {cfg.hidden_size}) on {dev.type}")
    for col in ("experts", "density", "expert bytes vs dense", "logits rel. error", "greedy tokens = dense",
                f"forward {held_out.shape[1]} tok (ms)", "generated ids"):
        table.add_column(col, justify="left" if col in ("experts", "generated ids") else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['density']:.1%}", f"{r['bytes_ratio']:.3f}", f"{r['logits_error']:.2e}",
                      f"{r['agreement']:.0%}", f"{r['ms']:.1f}", " ".join(map(str, r["tokens"])))
    console.print(table)
    console.print("transformers' own experts vs hare.patch(model) (dense: same logits) and pruned experts "
                  "(activation-aware, 256 calibration tokens); agreement = greedy tokens equal to transformers'. "
                  "Expert weights are random but heavy-tailed like trained ones; attention and embeddings are random.")
    return rows
