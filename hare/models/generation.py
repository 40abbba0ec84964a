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


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(folder))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: no tokenizer could be loaded from it ({e})") from None


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, cuda_graphs: bool = True) -> tuple[str, torch.Tensor]:
    """Greedy continuation of ``prompt``: (new text, new token ids)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    if inputs.input_ids.numel() == 0:
        raise InvalidArgumentError("prompt: it encodes to no tokens")
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    out = None
    if device.type == "cuda" and cuda_graphs:
        use_decode_attention(model)
        try:
            out = model.generate(**inputs, **kwargs, cache_implementation="static")
        except Exception as e:  # noqa: BLE001 - any failure of the compiled path falls back to eager decoding
            warnings.warn(f"static-cache (CUDA graph) decoding failed, decoding eagerly: {type(e).__name__}: {e}")
    if out is None:
        out = model.generate(**inputs, **kwargs)
    new = out[0, inputs.input_ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 512) -> tuple[float, int]:
    """Perplexity of ``input_ids`` (1-D) over consecutive windows of ``window`` tokens: (ppl, tokens scored)."""
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise InvalidArgumentError("text: needs at least 2 tokens to score")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for chunk in input_ids.split(window):
        if chunk.numel() < 2:
            continue
        logits = model(input_ids=chunk[None].to(device), use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:].to(device), reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count), count
