"""Single-token decode attention that reads the KV cache as stored.

transformers' decode steps spend most of their non-expert time copying the cache, in two ways:

* Grouped-query heads (Mixtral, Qwen3-MoE, OLMoE ...): given a mask (a static cache always gives one), its SDPA
  function up to 5.2x repeats every key/value head ``num_key_value_groups`` times, a copy of the whole cache per
  layer; 2.2 ms of every Qwen3-30B-A3B layer at batch 128 over 1024 cached tokens on the H100 (notes/model.md).
  For a single query token the query heads that share a key/value head are laid out as that head's query rows, and
  SDPA runs on the cache as stored.
* Multi-head latent attention (DeepSeek-V2/V3 and the other ``expand_kv`` models): the cache holds the compressed
  latent, and every step expands all of it into per-head keys and values through ``kv_b_proj``, a GEMM and a
  write of ``heads * (k + v)`` values for every cached token. For a single query token ``kv_b_proj`` is absorbed
  instead: the query's no-position part goes through the key half of ``kv_b_proj`` into latent space, attention
  runs over the latent cache as one key/value head shared by all query heads, and the value half of
  ``kv_b_proj`` maps the attended latent back to each head. The same sum, in another order.

Every other call (prefill, per-head masks, position biases, soft-capping, sinks) goes to transformers' SDPA
unchanged. ``use_decode_attention(model)`` switches a model that uses SDPA to this path; the benchmark applies it
to every variant alike, and ``hare generate`` uses it for its static-cache decoding. ``absorbable(module)`` says
whether a latent-attention module's ``expand_kv`` is the expansion that can be absorbed, and
``absorbed_latent_attention`` is that absorbed step on its own (``hare.bench.attention`` times both paths).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "hare_decode_sdpa"
# attention features beyond plain SDPA (biases, soft-capping, sinks): such calls keep transformers' own path
_NOT_PLAIN_SDPA = ("position_bias", "softcap", "s_aux")
# latent attention over an unaligned cache length: the largest batch whose scores are still laid out (b, heads, L)
# (measured: bench/results/attention_h200*.json, model_attention_deepseek_h200*.json)
LATENT_BY_HEAD_MAX_BATCH = 2


def decode_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (b, heads, q, d), key/value (b, kv_heads, L, d), or for a
    latent-attention module switched by ``use_decode_attention`` the latent (b, 1, L, rank) and the position key
    (b, 1, L, rope); returns (b, q, heads, dv) and no weights."""
    batch, heads, q_len, _ = query.shape
    single_plain_query = (q_len == 1 and (attention_mask is None or attention_mask.shape[1] == 1)
                          and all(kwargs.get(k) is None for k in _NOT_PLAIN_SDPA)
                          and not kwargs.get("output_attentions", False))
    if _keeps_latent(module):
        if single_plain_query and not dropout:
            return absorbed_latent_attention(module, query, key, value, attention_mask, scaling), None
        key, value = type(module).expand_kv(module, key, value)
    groups = getattr(module, "num_key_value_groups", 1)
    if not (single_plain_query and groups > 1 and key.shape[1] * groups == heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # head h = g * groups + r attends with key/value head g (repeat_kv's order): row r of group g's query
    rows = query.reshape(batch, heads // groups, groups, query.shape[-1])
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def absorbed_latent_attention(module, query, latent, rope_key, attention_mask, scaling) -> torch.Tensor:
    """One query token over the latent cache: (b, heads, 1, nope + rope) query -> (b, 1, heads, v). Two batched
    GEMMs over the cache as stored (no concatenated copy): float32 scores, probabilities rounded to the cache's
    dtype for the value product, as flash attention does. The scores are laid out (b, heads, L), except for a
    cache length that is not a multiple of 8 above batch ``LATENT_BY_HEAD_MAX_BATCH``: there they are laid out
    (b, L, heads), since an operand whose leading dimension is an odd length (a static cache of 1024 + 1) takes
    cuBLAS off its aligned kernels, 0.37 ms more per layer at batch 128 on the H200 (notes/model.md). SDPA over
    one 576-wide latent head instead falls to a slow kernel: 0.12 ms at any batch up to 8."""
    batch, heads, _, qk_dim = query.shape
    nope, rank = module.qk_nope_head_dim, module.kv_lora_rank
    w_key, w_value = module.kv_b_proj.weight.view(heads, nope + module.v_head_dim, rank).split(
        [nope, module.v_head_dim], dim=1)
    q_latent, q_rope = torch.einsum("bhn,hnr->bhr", query[:, :, 0, :nope], w_key), query[:, :, 0, nope:]
    latent, rope_key = latent[:, 0], rope_key[:, 0]  # (b, L, rank): keys and values at once; (b, L, rope)
    by_head = batch <= LATENT_BY_HEAD_MAX_BATCH or latent.shape[1] % 8 == 0
    if by_head:  # (b, heads, L)
        scores = _float32_bmm(q_latent, latent.mT) + _float32_bmm(q_rope, rope_key.mT)
    else:  # (b, L, heads)
        scores = _float32_bmm(latent, q_latent.mT) + _float32_bmm(rope_key, q_rope.mT)
    scores = scores * (scaling if scaling is not None else qk_dim ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, 0] if by_head else attention_mask[:, 0].mT  # (b, 1, L) or (b, L, 1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1 if by_head else 1).to(latent.dtype)
    out = torch.bmm(probs, latent) if by_head else torch.bmm(latent.mT, probs).mT  # (b, heads, rank)
    return torch.einsum("bhr,hvr->bhv", out, w_value).unsqueeze(1)


def _float32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 without a float32 copy of b on CUDA."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _keep_latent(self, kv_nope, k_rot):
    """Instance ``expand_kv`` of a switched latent-attention module: under this attention the latents go to
    ``decode_sdpa`` as they are (it expands them itself where it must)."""
    if self.config._attn_implementation == ATTENTION_NAME:
        return kv_nope, k_rot
    return type(self).expand_kv(self, kv_nope, k_rot)


def _keeps_latent(module) -> bool:
    return getattr(module.__dict__.get("expand_kv"), "__func__", None) is _keep_latent


def absorbable(module) -> bool:
    """Whether ``module.expand_kv`` is the latent expansion ``absorbed_latent_attention`` reorders: keys
    [kv_b_proj's key half of the latent, the shared position key] and values its value half, per head. Checked
    on the module's own weights."""
    proj = getattr(module, "kv_b_proj", None)
    names = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    if not (callable(getattr(type(module), "expand_kv", None)) and type(proj) is nn.Linear and proj.bias is None
            and not proj.weight.is_meta and all(isinstance(getattr(module, n, None), int) for n in names)):
        return False
    rank, nope, rope, v = (getattr(module, n) for n in names)
    heads, rest = divmod(proj.out_features, nope + v)
    if rest or proj.in_features != rank:
        return False
    gen = torch.Generator().manual_seed(0)
    latent, k_rot = (torch.randn(1, 1, 3, d, generator=gen).to(proj.weight) for d in (rank, rope))
    with torch.no_grad():
        key, value = type(module).expand_kv(module, latent, k_rot)
        kv = F.linear(latent[0, 0], proj.weight).view(3, heads, nope + v).transpose(0, 1)
    expected_key = torch.cat([kv[..., :nope], k_rot[0].expand(heads, 3, rope)], dim=-1)
    return (key.shape == (1, heads, 3, nope + rope) and value.shape == (1, heads, 3, v)
            and torch.allclose(key[0], expected_key) and torch.allclose(value[0], kv[..., nope:]))


def use_decode_attention(model) -> bool:
    """Switches ``model`` from SDPA to ``decode_sdpa`` (masks built as for SDPA), and its latent-attention modules
    to keeping their cache compressed until attention; True if it was switched. Models on another attention
    implementation are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, decode_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        return False
    # also where the config already named this attention (models built from one config object share it)
    for module in model.modules():
        if not _keeps_latent(module) and absorbable(module):
            module.expand_kv = types.MethodType(_keep_latent, module)
    return True
