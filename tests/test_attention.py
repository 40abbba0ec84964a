"""hare.models.attention: single-token decode over the KV cache as stored gives transformers' logits, and is the
path those calls take (transformers' SDPA function, or the latent expansion, is made to fail on them)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hare.models.attention as attention
from hare.models.attention import use_decode_attention
from hare.bench.model import static_decode_step
from hare.models.configs import tiny_config

from helpers import small_causal_lm


def _model(arch, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval().requires_grad_(False)


@pytest.mark.parametrize("arch,heads,kv_heads", [("qwen3_moe", 4, 2), ("mixtral", 8, 2), ("olmoe", 4, 1),
                                                  ("deepseek_v2", 4, 4), ("deepseek_v3", 4, 4)])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_decode_equals_the_full_forward_and_skips_transformers_sdpa(arch, heads, kv_heads, batch, monkeypatch):
    model = _model(arch, num_attention_heads=heads, num_key_value_heads=kv_heads)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=tokens).logits[:, -1]
    assert use_decode_attention(model)
    assert model.config._attn_implementation == attention.ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME] is attention.decode_sdpa
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
    use_decode_attention(model)
    calls = []
    stock = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or stock(*a, **k))
    step = static_decode_step(model, tokens[:, :5], tokens[:, 5:])
    torch.testing.assert_close(step()[:, -1], full, rtol=1e-5, atol=1e-5)
    assert calls
    eager = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"), attn_implementation="eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager"


def test_packed_attention_traces_as_one_graph():
    """transformers compiles the static-cache decode step (fullgraph): the function must not break the graph."""
    model = _model("qwen3_moe")
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True
    ref = attention.sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    compiled = torch.compile(lambda *a: attention.decode_sdpa(module, *a, scaling=0.3)[0], backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature", [dict(softcap=30.0), dict(s_aux=torch.zeros(4)), dict(output_attentions=True)])
def test_calls_beyond_plain_sdpa_keep_transformers_path(feature, monkeypatch):
    model = _model("qwen3_moe")
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or (None, None))
    attention.decode_sdpa(module, q, k, v, None, **feature)
    assert len(calls) == 1 and all(calls[0][key] is value for key, value in feature.items())


def _latent_attention_types() -> list[str]:
    """Causal-LM types of the installed transformers whose attention keeps a latent cache (an ``expand_kv``)."""
    import importlib
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            continue
        if any(callable(getattr(c, "expand_kv", None)) for c in vars(module).values() if isinstance(c, type)):
            found.append(model_type)
    return found


def test_latent_attention_decodes_over_the_compressed_cache_to_the_same_logits(monkeypatch):
    """Every latent-attention model that builds and decodes at small sizes: after the switch its decode step
    never expands the cache and gives the full forward's last logits."""
    types = _latent_attention_types()
    assert {"deepseek_v2", "deepseek_v3"} <= set(types)
    checked = []
    for model_type in types:
        model = small_causal_lm(model_type, num_key_value_heads=4)  # latent attention: one key per head
        if model is None:
            continue
        tokens = torch.randint(4, 90, (2, 8), generator=torch.Generator().manual_seed(3))
        try:
            with torch.no_grad():
                full = model(input_ids=tokens).logits[:, -1]
            static_decode_step(model, tokens[:, :7], tokens[:, 7:])
        except Exception:  # noqa: BLE001 - the unswitched model does not decode at these sizes: not a case
            continue
        classes = {type(m) for m in model.modules() if callable(getattr(type(m), "expand_kv", None))}
        expansions = []
        for cls in classes:
            stock_expand = cls.expand_kv
            monkeypatch.setattr(cls, "expand_kv", lambda self, kv, rot, _f=stock_expand: expansions.append(
                kv.shape[2]) or _f(self, kv, rot))
        assert use_decode_attention(model)
        switched = [m for m in model.modules() if attention._keeps_latent(m)]
        assert switched and all(type(m) in classes for m in switched), model_type
        step = static_decode_step(model, tokens[:, :7], tokens[:, 7:])
        assert expansions, "the cache prefill expands the latents"
        expansions.clear()
        torch.testing.assert_close(step()[:, -1], full, rtol=1e-5, atol=1e-5, msg=model_type)
        assert not expansions, f"{model_type}: a decode step expanded the latent cache"
        checked.append(model_type)
        monkeypatch.undo()
    assert {"deepseek_v2", "deepseek_v3"} <= set(checked) and len(checked) >= 8, checked


def test_latent_modules_leave_the_switch_with_their_own_expansion():
    """A latent module whose projection is not a plain bias-free linear is not switched, and a switched module
    expands as before when the model goes back to SDPA."""
    model = _model("deepseek_v2")
    attn = model.model.layers[0].self_attn
    attn.kv_b_proj.bias = torch.nn.Parameter(torch.zeros(attn.kv_b_proj.out_features))
    use_decode_attention(model)
    assert not attention._keeps_latent(attn) and attention._keeps_latent(model.model.layers[1].self_attn)
    model.set_attn_implementation("sdpa")
    other = model.model.layers[1].self_attn
    latent, rot = torch.randn(1, 1, 5, other.kv_lora_rank), torch.randn(1, 1, 5, other.qk_rope_head_dim)
    key, value = other.expand_kv(latent, rot)
    assert key.shape[1] == model.config.num_attention_heads and key.shape[2] == 5


def test_models_built_on_one_config_are_each_switched():
    """transformers' models keep the config object they are built from: a second model on a config the first
    switch changed is switched too, latent modules included; the benchmark builds each variant on its own copy."""
    from hare.bench.model import _build

    config = tiny_config("deepseek_v2")
    first = AutoModelForCausalLM.from_config(config)
    assert use_decode_attention(first) and config._attn_implementation == attention.ATTENTION_NAME
    second = AutoModelForCausalLM.from_config(config)
    assert use_decode_attention(second)
    assert any(attention._keeps_latent(m) for m in second.modules())
    fresh = tiny_config("deepseek_v2")
    built = _build(fresh, torch.device("cpu"), torch.float32, "hare")
    assert built.config._attn_implementation == attention.ATTENTION_NAME
    assert fresh._attn_implementation != attention.ATTENTION_NAME
    assert _build(fresh, torch.device("cpu"), torch.float32, "sdpa").config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch,kv_heads", [("deepseek_v2", 4), ("qwen3_moe", 2)])
def test_the_attention_benchmark_times_paths_that_compute_the_same(arch, kv_heads):
    """hare.bench.attention compares transformers' decode attention with Hare's on the same cache: every variant
    it times gives transformers' output."""
    from hare.bench.attention import _variants

    module = _model(arch, num_attention_heads=4, num_key_value_heads=kv_heads).model.layers[0].self_attn
    cache_bytes, fns = _variants(module, 3, 11, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert cache_bytes > 0 and set(fns) == {"transformers", "hare"}
    torch.testing.assert_close(fns["hare"](), fns["transformers"](), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("b", [1, 3])  # scores laid out by head, and (odd cache length) by cache slot
def test_absorbed_latent_attention_applies_the_mask(additive, b):
    """Cache slots masked out (padding, unfilled static slots) are skipped as transformers' SDPA skips them."""
    model = _model("deepseek_v2", num_attention_heads=4, num_key_value_heads=4)
    assert use_decode_attention(model)
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(6)
    L = 9 if b > 1 else 16
    query = torch.randn(b, 4, 1, module.qk_nope_head_dim + module.qk_rope_head_dim, generator=gen)
    latent = torch.randn(b, 1, L, module.kv_lora_rank, generator=gen)
    rope_key = torch.randn(b, 1, L, module.qk_rope_head_dim, generator=gen)
    mask = torch.rand(b, 1, 1, L, generator=gen) > 0.4
    mask[..., 0] = True
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    key, value = type(module).expand_kv(module, latent, rope_key)
    expected = attention.sdpa_attention_forward(module, query, key, value, mask, scaling=module.scaling)[0]
    out, _ = attention.decode_sdpa(module, query, latent, rope_key, mask, scaling=module.scaling)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_decode_step_over_a_full_sliding_window_is_marked_not_capturable():
    """transformers' full sliding-window static layer makes a host tensor every step, which CUDA-graph capture
    refuses, so the model benchmark times such steps eagerly only (GPT-OSS: a 4-token window here)."""
    tokens = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(3))
    assert not static_decode_step(_model("gpt_oss"), tokens[:, :9], tokens[:, 9:]).capturable  # 9 > window 4
    assert static_decode_step(_model("gpt_oss"), tokens[:, :3], tokens[:, 3:4]).capturable  # 3 + 1 fits the window
    assert static_decode_step(_model("mixtral"), tokens[:, :9], tokens[:, 9:]).capturable
