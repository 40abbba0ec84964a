"""``python -m hare.bench.attention``: single-token decode attention over a cache, on the real models' shapes.

For each model of ``hare.models.configs.REAL`` (its first attention module, bf16) and a cache of 1024 and of 1025
tokens (an aligned length, and the model benchmark's static cache of 1024 + 1) at batch 1 to 128, from the cache as stored to the per-head output: transformers' path as installed (SDPA after the
grouped-query repeat, or for latent attention the expansion through ``kv_b_proj`` and SDPA) against
``hare.models.attention``'s (grouped heads packed as query rows; for latent attention ``kv_b_proj`` absorbed).
CUDA-graph replays, L2 flushed before each. Reports
ms, the speedup, and the cache bytes read per second against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch

from .common import geomean, write_results
from .toolkit import Timer, measure_ceilings

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXTS = (1024, 1025)


def _attention_module(name: str, device):
    from transformers import AutoModelForCausalLM

    from ..models.configs import real_config

    torch.manual_seed(0)
    config = real_config(name, num_layers=1)
    with torch.device("meta"):
        layer = AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    return layer.to_empty(device=device).to(torch.bfloat16).requires_grad_(False).apply(_init_linear)


def _init_linear(module):
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)


def _variants(module, batch: int, context: int, device, gen):
    """(cache bytes, {variant: fn}) for one decode step of ``module`` at ``batch`` over ``context`` tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..models import attention

    dtype = next(module.parameters()).dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=device)
    config, scale = module.config, module.scaling
    heads = config.num_attention_heads
    if attention.absorbable(module):
        rank, nope, rope = module.kv_lora_rank, module.qk_nope_head_dim, module.qk_rope_head_dim
        query, latent, rope_key = randn(batch, heads, 1, nope + rope), randn(batch, 1, context, rank), randn(
            batch, 1, context, rope)

        def transformers_path():
            key, value = type(module).expand_kv(module, latent, rope_key)
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scale)[0]

        def hare_path():
            return attention.absorbed_latent_attention(module, query, latent, rope_key, mask, scale)
        cache_bytes = latent.nbytes + rope_key.nbytes
    else:
        kv_heads, dim = config.num_key_value_heads, module.head_dim
        query, key, value = randn(batch, heads, 1, dim), randn(batch, kv_heads, context, dim), randn(
            batch, kv_heads, context, dim)

        def transformers_path():
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scale)[0]

        def hare_path():
            return attention.decode_sdpa(module, query, key, value, mask, scaling=scale)[0]
        cache_bytes = key.nbytes + value.nbytes
    return cache_bytes, {"transformers": transformers_path, "hare": hare_path}


@torch.no_grad()
def run(models=None, batches=BATCHES, contexts=CONTEXTS, out_json=None, device="cuda") -> dict:
    from ..models.configs import REAL

    device = torch.device(device)
    ceilings = measure_ceilings(device)
    timer, gen = Timer(device), torch.Generator(device=device).manual_seed(0)
    records = []
    for name in models or list(REAL):
        module = _attention_module(name, device)
        for context, batch in ((c, b) for c in contexts for b in batches):
            cache_bytes, fns = _variants(module, batch, context, device, gen)
            ms = {variant: timer.time_graph(fn, budget_s=0.05) for variant, fn in fns.items()}
            for variant, t in ms.items():
                if variant == "transformers":
                    continue
                tbps = cache_bytes / (t * 1e-3) / 1e12
                records.append({"bench": "attention", "case": f"{name}/decode-b{batch}-L{context}", "model": name,
                                "tokens": batch, "context": context, "variant": variant,
                                "ours_ms": t, "baseline": "transformers",
                                "baseline_ms": ms["transformers"], "speedup": ms["transformers"] / t,
                                "cache_bytes": cache_bytes, "ours_tbps": tbps,
                                "frac_copy_bw": tbps / ceilings["copy_tbps"]})
                print(f"{name:>18} L{context} b{batch:<4} {variant:>6} {t:8.4f} ms  "
                      f"transformers {ms['transformers']:8.4f} ms  x{ms['transformers'] / t:5.2f}  "
                      f"{tbps:5.2f} TB/s ({100 * tbps / ceilings['copy_tbps']:3.0f}% of copy)", flush=True)
        del module
    summary = {"geomean_speedup": geomean(r["speedup"] for r in records), **ceilings}
    return write_results(device, summary, records, out_json)


def main(argv=None):
    from ..models.configs import REAL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(REAL), default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    run(args.models, args.batches, args.contexts, args.out_json)


if __name__ == "__main__":
    main()
