"""CPU benchmark of the reference path end to end: ``hare eval``'s perplexity loop on a ~100M-parameter random
Qwen3-MoE checkpoint, dense against its 25% Hare checkpoint (both loaded with ``load_model``, so both run the
reference experts). The sparse run should cost at most ~1.3x the dense one: experts are expanded once (routed
ones only) and reused across windows.

    python -m hare.bench.reference --out-json bench/results/reference_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .common import write_results

# ~100M parameters, ~90M of them in the experts (6 layers x 32 experts x 3 x 512 x 384)
SHAPE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4,
             num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=4096,
             max_position_embeddings=1024)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens scored (random ids)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--out-json", default=None)
    a = ap.parse_args(argv)

    from ..models.hare_folder import load_model, sparsify_checkpoint
    from ..models.configs import tiny_model
    from ..models.generation import perplexity

    ids = torch.randint(4, SHAPE["vocab_size"], (a.tokens,), generator=torch.Generator().manual_seed(0))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, hare_dir = Path(tmp) / "dense", Path(tmp) / "hare"
        model = tiny_model("qwen3_moe", **SHAPE)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(dense_dir)
        del model
        sparsify_checkpoint(dense_dir, hare_dir, a.density, progress=False)
        for variant, folder in (("dense", dense_dir), (f"hare-{a.density}", hare_dir)):
            model = load_model(folder)
            t0 = time.perf_counter()
            ppl, count = perplexity(model, ids, a.window)
            seconds = time.perf_counter() - t0
            records.append({"bench": "reference_eval", "variant": variant, "params": params, "tokens": count,
                            "window": a.window, "seconds": seconds, "perplexity": ppl,
                            "threads": torch.get_num_threads()})
            print(f"{variant:<12} {seconds:8.2f} s  ({count} tokens, perplexity {ppl:.2f})")
            del model
    summary = {"sparse_over_dense_time": records[1]["seconds"] / records[0]["seconds"]}
    return write_results("cpu", summary, records, a.out_json)


if __name__ == "__main__":
    main()
