"""Model configurations built locally (no hub access): tiny random ones for tests and the demo, and the real
shapes of published MoE models for the end-to-end benchmark, plus a small word-level tokenizer to go with them."""

from __future__ import annotations

from pathlib import Path

_TINY_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Per architecture, what differs from the common tiny shape; routing options are chosen to exercise each
# model's own routing (normalised or not, grouped top-k, routed scaling, shared experts).
TINY = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8, norm_topk_prob=True),
    "deepseek_v2": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=4, topk_method="greedy"),
    "deepseek_v3": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=4,
                        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["linear_attention", "full_attention"]),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, input_jitter_noise=0.0),
    "glm4_moe": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                     first_k_dense_replace=1, head_dim=8, routed_scaling_factor=1.5, n_group=2, topk_group=1),
    "dots1": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                  first_k_dense_replace=0, head_dim=8, routed_scaling_factor=2.0, norm_topk_prob=True),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_intermediate_size=32,
                         moe_layer_start_index=0, head_dim=8),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, head_dim=8),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, intermediate_size_mlp=64,
                        head_dim=8, interleave_moe_layer_step=1),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=8, sliding_window=4),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                 ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2,
                             "ffn_act_fn": {"name": "silu"}}),
}

# Real shapes of published checkpoints (from their config.json files), for the benchmark; the layer count is set
# by the benchmark to what fits the GPU.
REAL = {
    "Mixtral-8x7B": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                                     rope_theta=1e6)),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        norm_topk_prob=True, max_position_embeddings=40960)),
    "DeepSeek-V2-Lite": ("deepseek_v2", dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                                             num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
                                             num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                                             q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                             v_head_dim=128, head_dim=64, topk_method="greedy", n_group=1,
                                             topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                                             max_position_embeddings=163840)),
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                            moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                            num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                                            max_position_embeddings=8192)),
    # biased experts with a clamped SwiGLU (activation "gpt-oss"); attention alternates a 128-token sliding window
    # (even layers) with full attention, and has attention sinks; RoPE is YaRN-scaled from 4096 tokens
    "GPT-OSS-20B": ("gpt_oss", dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                                    num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                                    num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                                    swiglu_limit=7.0, attention_bias=True, tie_word_embeddings=False,
                                    max_position_embeddings=131072,
                                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                                         beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                         original_max_position_embeddings=4096))),
}


def tiny_config(model_type: str, **overrides):
    """A tiny random-initialisable config of ``model_type`` (one of ``TINY``)."""
    from transformers import AutoConfig

    common = {} if model_type == "dbrx" else _TINY_COMMON
    kwargs = {**common, **TINY[model_type], **overrides}
    if model_type == "dbrx":
        kwargs.update(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, **kwargs)


def real_config(name: str, num_layers: int | None = None, **overrides):
    """The config of ``REAL[name]`` with ``num_layers`` decoder layers (default: the real count) and any other field
    replaced by ``overrides`` (a test's smaller sizes)."""
    from transformers import AutoConfig

    model_type, kwargs = REAL[name]
    if num_layers is not None:
        overrides = {**overrides, "num_hidden_layers": num_layers}
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


WORDS = ("the a of and to in is it that was for on are as with his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them then "
         "she many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after "
         "words called just where most know").split()


def tiny_tokenizer(vocab_size: int = 96):
    """A word-level tokenizer over ``WORDS`` (ids 0-3 are <pad>, <s>, </s>, <unk>), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS))[: vocab_size - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random tiny ``model_type`` model (float32, eval). Expert weights are redrawn at std 1/sqrt(fan-in) so that
    the experts, not the residual stream, dominate each layer's update (transformers' 0.02 init makes them faint)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name and p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def save_tiny_model(model_type: str, folder, seed: int = 0):
    """Write a random tiny ``model_type`` checkpoint with its tokenizer to ``folder``; returns the model."""
    model = tiny_model(model_type, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model
