"""A small Mixtral-style MoE trained from scratch on the accuracy corpus, to measure what pruning costs.

No model hub is reachable, so the accuracy benchmark trains its own model: a byte-level BPE tokenizer and a
transformers ``MixtralForCausalLM`` (8 experts, top-2, ~55M parameters at size ``small``) on ``train.txt`` of the
corpus (``hare.bench.corpus``), seeded. Training runs a fixed number of steps (default: ``epochs`` passes over the
training tokens) so that a run is reproducible, with a wall-clock cap as a safety net (recorded if it fires).
Convergence is shown by the validation perplexity against the unigram perplexity of the corpus, and the experts'
use by their routing load on validation text. The folder written is a plain transformers checkpoint (config,
safetensors, tokenizer) plus ``train_info.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from .common import run_info

EOS = "<|endoftext|>"
INFO = "train_info.json"


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    seq: int
    batch: int
    lr: float
    epochs: float
    max_train_bytes: int | None = None  # toy runs read only the start of the training text


SIZES = {
    # hidden and ffn of 640 = 10 windows of 64 columns: every density is exact at bw 16, 32 and 64
    "small": Size(vocab=8192, hidden=640, ffn=640, layers=4, heads=10, kv_heads=5, experts=8, top_k=2, seq=512,
                  batch=32, lr=1e-3, epochs=8),
    "toy": Size(vocab=320, hidden=64, ffn=64, layers=2, heads=4, kv_heads=2, experts=8, top_k=2, seq=64, batch=8,
                lr=3e-3, epochs=2, max_train_bytes=60_000),
}


def read_split(corpus_dir, split: str, max_bytes: int | None = None) -> str:
    path = Path(corpus_dir) / f"{split}.txt"
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: missing; build the corpus with scripts/fetch_corpus.sh")
    text = path.read_text(encoding="utf-8")
    return text if max_bytes is None else text[:max_bytes]


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE tokenizer (every text encodes; no unknown tokens) trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D int64) of ``text``, paragraph by paragraph (fast, and no window straddles a huge string)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids(EOS)
    return torch.tensor([t for p in ids for t in (*p, eos)], dtype=torch.long)


def unigram_perplexity(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity on ``valid_ids`` of the unigram model of ``train_ids`` (add-one smoothed): the bar a trained
    model must clear by far."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[valid_ids].mean()))


def build_model(size: Size, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.ffn,
                           num_hidden_layers=size.layers, num_attention_heads=size.heads,
                           num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads,
                           num_local_experts=size.experts, num_experts_per_tok=size.top_k,
                           max_position_embeddings=size.seq, router_aux_loss_coef=0.02, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return MixtralForCausalLM(config)


@torch.no_grad()
def routing_load(model, ids: torch.Tensor, seq: int) -> dict[str, list[float]]:
    """Fraction of the (token, slot) assignments each expert gets, per experts module, on ``ids``."""
    from ..models.patch import experts_modules

    counts = {}

    def hook_for(name):
        def hook(module, args):
            top_k_index = args[1]
            c = torch.bincount(top_k_index.flatten(), minlength=model.config.num_local_experts)
            counts[name] = counts.get(name, 0) + c.cpu()
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in experts_modules(model).items()]
    device = next(model.parameters()).device
    try:
        for chunk in ids.split(seq):
            model(input_ids=chunk[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: [round(float(v), 4) for v in c.double() / c.sum()] for n, c in counts.items()}


def _lr(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
@torch.no_grad()
def _mean_loss(model, ids: torch.Tensor, seq: int, device, max_windows: int = 64) -> float:
    """Mean next-token loss of the first ``max_windows`` windows of ``seq`` tokens, as one batch (every window scores
    seq - 1 tokens, so the batch's mean is the mean of the windows' losses)."""
    windows = ids[: (ids.numel() // seq) * seq].view(-1, seq)[:max_windows].to(device)
    return float(model(input_ids=windows, labels=windows, use_cache=False).loss)


def train(corpus_dir, out_dir, size: str = "small", seed: int = 0, steps: int | None = None,
          max_seconds: float = 300.0, device=None, log=print) -> dict:
    """Train the tokenizer and the model on ``corpus_dir``/train.txt and save both to ``out_dir``; returns (and
    writes to ``out_dir``/train_info.json) what the run did."""
    from ..models.generation import perplexity

    if size not in SIZES:
        raise InvalidArgumentError(f"size: expected one of {list(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    train_text = read_split(corpus_dir, "train", cfg.max_train_bytes)
    valid_text = read_split(corpus_dir, "valid", cfg.max_train_bytes and cfg.max_train_bytes // 4)
    tokenizer = train_tokenizer(train_text, cfg.vocab)
    train_ids, valid_ids = encode(tokenizer, train_text), encode(tokenizer, valid_text)
    tokens_per_step = cfg.batch * cfg.seq
    steps = steps or max(1, round(cfg.epochs * train_ids.numel() / tokens_per_step))
    log(f"tokenizer: {len(tokenizer)} tokens, {train_ids.numel()} train / {valid_ids.numel()} valid tokens "
        f"({time.perf_counter() - t0:.1f} s); {steps} steps of {tokens_per_step} tokens")

    model = build_model(cfg, seed).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  **({"fused": True} if device.type == "cuda" else {}))
    gen = torch.Generator(device=device).manual_seed(seed)
    data = train_ids.to(device)
    offsets = torch.arange(cfg.seq, device=device)
    curve, stopped_at, start = [], None, time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, cfg.lr)
        starts = torch.randint(0, data.numel() - cfg.seq, (cfg.batch,), generator=gen, device=device)
        batch = data[starts[:, None] + offsets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            model.eval()
            curve.append({"step": step + 1, "train_loss": round(float(loss.detach()), 4),
                          "valid_loss": round(_mean_loss(model, valid_ids, cfg.seq, device), 4),
                          "seconds": round(time.perf_counter() - start, 1)})
            model.train()
            log(json.dumps(curve[-1]))
        if time.perf_counter() - start > max_seconds and step + 1 < steps:
            stopped_at = step + 1
            log(f"stopping after {stopped_at} of {steps} steps: over max_seconds = {max_seconds}")
            break
    model.eval()
    train_seconds = time.perf_counter() - start
    valid_ppl, scored = perplexity(model, valid_ids, cfg.seq)
    info = {**run_info(device), "name": f"mixtral-{size}-{params / 1e6:.3g}m-pydoc", "size": size, "config": asdict(cfg), "seed": seed, "params": params,
            "steps": stopped_at or steps, "planned_steps": steps, "stopped_early": stopped_at is not None,
            "train_tokens": (stopped_at or steps) * tokens_per_step, "train_corpus_tokens": train_ids.numel(),
            "train_seconds": round(train_seconds, 1), "valid_ppl": valid_ppl, "valid_tokens": scored,
            "unigram_ppl": unigram_perplexity(train_ids, valid_ids, len(tokenizer)),
            "routing_load": routing_load(model, valid_ids, cfg.seq), "curve": curve,
            "corpus": json.loads((Path(corpus_dir) / "corpus.json").read_text()).get("source", str(corpus_dir))
            if (Path(corpus_dir) / "corpus.json").is_file() else str(corpus_dir)}
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / INFO).write_text(json.dumps(info, indent=1))
    log(f"valid ppl {valid_ppl:.2f} (unigram {info['unigram_ppl']:.1f}), {params / 1e6:.1f}M params, "
        f"{train_seconds:.0f} s -> {out_dir}")
    return info
