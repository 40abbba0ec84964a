"""Text generation and perplexity for dense and Hare checkpoints (``hare generate``, ``hare eval``).

On CUDA, decoding uses transformers' static KV cache, with which transformers compiles the decode step
(torch.compile, CUDA graphs): the whole step, Hare's experts included, replays as one graph with no host sync. A
static cache always carries a mask, so the model is first switched to ``hare.models.attention``'s decode attention,
which reads the cache as stored instead of repeating its heads. If that path fails on a model, generation falls
back to eager decoding and says so.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidArgumentError
from .attention import use_decode_attention


# files a transformers tokenizer is built from; a folder with none of them gets an empty one (no error) from
# AutoTokenizer, so they are looked for first
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(folder):
    """The tokenizer of a checkpoint folder; a clear error when it has none or transformers builds an empty one."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); copy the source "
                              "model's tokenizer files into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: no tokenizer could be loaded from it ({e})") from None
    if len(tokenizer) < 2:
        raise CheckpointError(f"{folder}: its tokenizer files build a tokenizer of {len(tokenizer)} token(s)")
    return tokenizer


WINDOW = 512  # tokens per scored window, unless the model's positions end sooner


def default_window(config) -> int:
    return min(WINDOW, getattr(config, "max_position_embeddings", None) or WINDOW)


def check_window(config, window: int) -> None:
    """``window`` tokens fit the model: at least 2, at most its ``max_position_embeddings``."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise InvalidArgumentError(f"window: expected an int >= 2, got {window!r}")
    if limit is not None and window > limit:
        raise InvalidArgumentError(f"window: {window} tokens exceed the model's max_position_embeddings ({limit})")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, cuda_graphs: bool = True,
             streamer=None) -> tuple[str, torch.Tensor]:
    """Greedy continuation of ``prompt``: (new text, new token ids). ``streamer`` (a transformers streamer, e.g.
    ``TextStreamer``) receives the tokens as they are made."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    if inputs.input_ids.numel() == 0:
        raise InvalidArgumentError("prompt: it encodes to no tokens")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  streamer=streamer)
    out = None
    if device.type == "cuda" and cuda_graphs:
        use_decode_attention(model)
        try:
            out = model.generate(**inputs, **kwargs, cache_implementation="static")
        except Exception as e:  # noqa: BLE001 - any failure of the compiled path falls back to eager decoding
            if streamer is not None:
                streamer.end()  # what was streamed so far ends its line; eager decoding starts over
            warnings.warn(f"static-cache (CUDA graph) decoding failed, decoding eagerly from the start: "
                          f"{type(e).__name__}: {e}")
    if out is None:
        out = model.generate(**inputs, **kwargs)
    new = out[0, inputs.input_ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int | None = None, progress: bool = False) -> tuple[float, int]:
    """Perplexity of ``input_ids`` (1-D) over consecutive windows of ``window`` tokens (default: ``default_window``):
    (ppl, tokens scored)."""
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise InvalidArgumentError("text: needs at least 2 tokens to score")
    window = default_window(model.config) if window is None else window
    check_window(model.config, window)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    chunks = [c for c in input_ids.split(window) if c.numel() >= 2]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="scoring", unit="window")
    for chunk in chunks:
        logits = model(input_ids=chunk[None].to(device), use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:].to(device), reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count), count
