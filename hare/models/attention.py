"""Decode attention for grouped-query models that reads each cached key/value head once.

Given a mask (a static KV cache always gives one), transformers' SDPA attention up to 5.2x repeats every key/value
head ``num_key_value_groups`` times before calling SDPA, so each decode step copies the whole cache once per layer:
2.2 ms of every Qwen3-30B-A3B layer at batch 128 over 1024 cached tokens on the H100 (notes/model.md), more than
its experts. For a single query token the query heads that share a key/value head can instead be laid out as that
head's query rows; SDPA then runs on the cache as stored and computes the same thing. Every other call (prefill,
per-head masks, position biases, models without grouped heads) goes to transformers' SDPA unchanged.

``use_packed_gqa_attention(model)`` switches a model that uses SDPA to this function; the benchmark applies it to
every variant alike, and ``hare generate`` uses it for its static-cache decoding.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "hare_packed_gqa_sdpa"
# attention features beyond plain SDPA (biases, soft-capping, sinks): such calls keep transformers' own path
_NOT_PLAIN_SDPA = ("position_bias", "softcap", "s_aux")


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (b, heads, q, d), key/value (b, kv_heads, L, d); returns
    (b, q, heads, dv) and no weights."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, _ = query.shape
    packable = (q_len == 1 and groups > 1 and key.shape[1] * groups == heads
                and (attention_mask is None or attention_mask.shape[1] == 1)
                and all(kwargs.get(k) is None for k in _NOT_PLAIN_SDPA) and not kwargs.get("output_attentions", False))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # head h = g * groups + r attends with key/value head g (repeat_kv's order): row r of group g's query
    rows = query.reshape(batch, heads // groups, groups, query.shape[-1])
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_gqa_attention(model) -> bool:
    """Switches ``model`` from SDPA to ``packed_gqa_sdpa`` (masks built as for SDPA); True if it was switched. Models
    on another attention implementation are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, packed_gqa_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != "sdpa":
        return model.config._attn_implementation == ATTENTION_NAME
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config._attn_implementation == ATTENTION_NAME
