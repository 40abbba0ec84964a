"""hare.models.attention: single-token decode over the KV cache as stored gives transformers' logits, and is the
path those calls take (transformers' SDPA function is made to fail on them)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hare.models.attention as attention
from hare.models.attention import use_packed_gqa_attention
from hare.bench.model import static_decode_step
from hare.models.configs import tiny_config


def _model(arch, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval().requires_grad_(False)


@pytest.mark.parametrize("arch,heads,kv_heads", [("qwen3_moe", 4, 2), ("mixtral", 8, 2), ("olmoe", 4, 1)])
def test_packed_decode_equals_the_full_forward_and_skips_transformers_sdpa(arch, heads, kv_heads, monkeypatch):
    model = _model(arch, num_attention_heads=heads, num_key_value_heads=kv_heads)
    tokens = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=tokens).logits[:, -1]
    assert use_packed_gqa_attention(model)
    assert model.config._attn_implementation == attention.ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME] is attention.packed_gqa_sdpa
    stock = attention.sdpa_attention_forward
    calls = []

    def prefill_only(module, query, *args, **kwargs):
        assert query.shape[2] > 1, "a single-token query reached transformers' SDPA"
        calls.append(query.shape[2])
        return stock(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", prefill_only)
    step = static_decode_step(model, tokens[:, :9], tokens[:, 9:], chunk_tokens=12)
    assert calls, "the cache prefill runs through transformers' SDPA"
    for _ in range(2):
        torch.testing.assert_close(step()[:, -1], full, rtol=1e-5, atol=1e-5)


def test_models_without_grouped_heads_and_other_attentions_are_left_to_transformers(monkeypatch):
    model = _model("qwen3_moe", num_key_value_heads=4)  # no grouping: nothing to pack
    tokens = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=tokens).logits[:, -1]
    use_packed_gqa_attention(model)
    calls = []
    stock = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or stock(*a, **k))
    step = static_decode_step(model, tokens[:, :5], tokens[:, 5:])
    torch.testing.assert_close(step()[:, -1], full, rtol=1e-5, atol=1e-5)
    assert calls
    eager = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), attn_implementation="eager")
    assert not use_packed_gqa_attention(eager) and eager.config._attn_implementation == "eager"


def test_packed_attention_traces_as_one_graph():
    """transformers compiles the static-cache decode step (fullgraph): the function must not break the graph."""
    model = _model("qwen3_moe")
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True
    ref = attention.sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    compiled = torch.compile(lambda *a: attention.packed_gqa_sdpa(module, *a, scaling=0.3)[0], backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature", [dict(softcap=30.0), dict(s_aux=torch.zeros(4)), dict(output_attentions=True)])
def test_calls_beyond_plain_sdpa_keep_transformers_path(feature, monkeypatch):
    model = _model("qwen3_moe")
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or (None, None))
    attention.packed_gqa_sdpa(module, q, k, v, None, **feature)
    assert len(calls) == 1 and all(calls[0][key] is value for key, value in feature.items())
