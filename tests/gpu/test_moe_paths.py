"""hare.moe on the GPU: which path runs, and that every path equals the float32 reference."""

import copy
import warnings

import pytest
import torch

import hare
from hare.models import experts_modules, patch
from hare.models.configs import tiny_model, tiny_tokenizer
from hare.bench.model import capture_graph
from hare.models.generation import generate
from hare.moe import backend

from .moe_cases import make_routing, make_weights, make_x, reference, rel_err

pytestmark = pytest.mark.gpu


def test_dense_bf16_runs_the_hopper_kernels_and_matches_the_reference():
    H, F, E, k, T = 2048, 1408, 64, 6, 300
    wgu, wd = make_weights(E, H, F, "cuda")
    ids, w = make_routing(T, E, k, "cuda")
    x = make_x(T, H, "cuda")
    assert backend(x, wgu, wd) == ("hopper", "")
    out = hare.moe(x, ids, w, wgu, wd)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert rel_err(out, reference(x, ids, w, wgu, wd)) < 1e-2


def test_blocknm_bf16_runs_the_sparse_kernels_and_matches_the_dense_equivalent():
    H, F, E, k, T = 512, 384, 8, 2, 200
    wgu, wd = make_weights(E, H, F, "cuda")
    sgu, sd = hare.sparsify(wgu, bn=1, bm=2), hare.sparsify(wd, bn=1, bm=2)
    ids, w = make_routing(T, E, k, "cuda")
    x = make_x(T, H, "cuda")
    assert backend(x, sgu, sd) == ("hopper", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hare.moe(x, ids, w, sgu, sd)
    assert not [c for c in caught if "reference path" in str(c.message)]
    assert rel_err(out, reference(x, ids, w, sgu.to_dense(), sd.to_dense())) < 1e-2


def test_blocknm_the_kernels_do_not_take_says_why_once_and_matches():
    H, F, E, k, T = 512, 192, 8, 2, 100  # ffn % 128 = 64 without the halves layout: a panel mixes gate and up rows
    wgu, wd = make_weights(E, H, F, "cuda")
    sgu, sd = hare.sparsify(wgu, bn=1, bm=2), hare.sparsify(wd, bn=1, bm=2)
    ids, w = make_routing(T, E, k, "cuda")
    x = make_x(T, H, "cuda")
    path, why = backend(x, sgu, sd)
    assert path == "grouped_mm" and "halves=True" in why
    assert backend(x, wgu, sd) == ("hopper", "")  # a sparse down projection alone is fine
    assert backend(x, hare.sparsify(wgu, bn=1, bm=2, halves=True), sd) == ("hopper", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hare.moe(x, ids, w, sgu, sd)
        hare.moe(x, ids, w, sgu, sd)
    assert sum("grouped GEMM" in str(c.message) for c in caught) == 1
    assert rel_err(out, reference(x, ids, w, sgu.to_dense(), sd.to_dense())) < 1e-2


def test_biased_gpt_oss_experts_run_the_kernels_match_the_cpu_and_capture():
    """Expert biases and GPT-OSS's clamped SwiGLU run on the Hopper kernels, with no warning; the result matches
    the float64 CPU result and replays in a CUDA graph."""
    H, F, E, k, T = 256, 128, 8, 2, 64
    wgu, wd = make_weights(E, H, F, "cuda")
    ids, w = make_routing(T, E, k, "cuda")
    x = make_x(T, H, "cuda") * 4
    bgu, bd = (torch.randn(E, n, device="cuda").to(torch.bfloat16) for n in (2 * F, H))
    assert backend(x, wgu, wd, "gpt-oss") == ("hopper", "")
    run = lambda: hare.moe(x, ids, w, wgu, wd, "gpt-oss", check_ids=False, gate_up_bias=bgu, down_bias=bd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run()
    assert not [c for c in caught if "hare.moe" in str(c.message)]
    x64, w64, wgu64, wd64, bgu64, bd64 = (t.cpu().double() for t in (x, w, wgu, wd, bgu, bd))
    cpu = hare.moe(x64, ids.cpu(), w64, wgu64, wd64, "gpt-oss", gate_up_bias=bgu64, down_bias=bd64)
    assert out.dtype == torch.bfloat16 and rel_err(out.cpu(), cpu) < 1e-2
    replay = capture_graph(run, x.device)
    x.copy_(make_x(T, H, "cuda") * 4)  # new inputs in place: the replay must recompute
    again = hare.moe(x.cpu().double(), ids.cpu(), w64, wgu64, wd64, "gpt-oss", gate_up_bias=bgu64, down_bias=bd64)
    assert rel_err(replay().cpu(), again) < 1e-2


def test_sparsify_on_the_gpu_equals_the_cpu():
    w = torch.randn(4, 300, 256, device="cuda")
    for bn, bm in ((1, 1), (1, 2), (1, 5), (1, 10)):
        on_gpu = hare.sparsify(w, bn=bn, bm=bm)
        on_cpu = hare.sparsify(w.cpu(), bn=bn, bm=bm)
        assert torch.equal(on_gpu.mask().cpu(), on_cpu.mask())
        assert torch.equal(on_gpu.to_dense().cpu(), on_cpu.to_dense())


def test_patched_model_on_gpu_generates_the_same_with_and_without_cuda_graphs():
    model = patch(tiny_model("qwen3_moe", hidden_size=128, num_experts=8, moe_intermediate_size=128, head_dim=32))
    model = model.to("cuda", torch.bfloat16)
    tok = tiny_tokenizer()
    _, eager = generate(model, tok, "the a of and to in", 8, cuda_graphs=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, graphed = generate(model, tok, "the a of and to in", 8, cuda_graphs=True)
    assert not [c for c in caught if "decoding eagerly" in str(c.message)], [str(c.message) for c in caught]
    assert eager.numel() == graphed.numel() == 8
    assert torch.equal(eager.cpu(), graphed.cpu())


@pytest.mark.parametrize("arch,overrides", [
    ("gpt_oss", dict(hidden_size=128, intermediate_size=192, head_dim=32)),  # biases, clamped SwiGLU, ffn % 128 = 64
    ("llama4_text", dict(hidden_size=128, intermediate_size=128, intermediate_size_mlp=256, head_dim=32)),
])
@pytest.mark.parametrize("bm", [None, 2])
def test_patched_gpt_oss_and_llama4_on_the_gpu_run_the_kernels_and_keep_their_logits(arch, overrides, bm):
    """Dense: the patched model's logits equal the original's. Pruned to 25%: they equal the same pruned model's in
    float64 on the CPU reference path, as closely as that model's bf16 run on the reference path does (its own bf16
    noise, attention included: a pruned tiny Llama-4 is off by ~8% in bf16 on any path)."""
    model = tiny_model(arch, **overrides).to("cuda", torch.bfloat16)
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
        patch(model, bn=1 if bm else None, bm=bm)
        experts = next(iter(experts_modules(model).values()))
        probe = torch.empty(1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        assert backend(probe, experts.weight("gate_up"), experts.weight("down"), experts.activation)[0] == "hopper"
        out = model(ids).logits
        if not bm:
            assert rel_err(out, ref) < 2e-2
            return
        cpu = copy.deepcopy(model).cpu()
        f64 = copy.deepcopy(cpu).double()(ids.cpu()).logits
        floor = rel_err(cpu(ids.cpu()).logits, f64)
    assert rel_err(out.cpu(), f64) < max(3e-2, 1.5 * floor)


@pytest.mark.parametrize("bm", [None, 2])
def test_bench_decode_step_replayed_as_a_cuda_graph_equals_the_eager_step(bm):
    """`hare bench model` times decode as one captured CUDA graph: the patched model (dense, or sparse at 25%) must
    capture with no host sync and the replay must give the eager step's logits."""
    from hare.bench.model import capture_graph, static_decode_step

    model = tiny_model("qwen3_moe", hidden_size=128, num_experts=8, moe_intermediate_size=128, head_dim=32)
    model = patch(model.to("cuda", torch.bfloat16), bn=1 if bm else None, bm=bm).requires_grad_(False)
    experts = next(iter(experts_modules(model).values()))
    probe = torch.empty(1, 128, device="cuda", dtype=torch.bfloat16)
    assert backend(probe, experts.weight("gate_up"), experts.weight("down"))[0] == "hopper"
    tokens = torch.randint(0, model.config.vocab_size, (4, 33), device="cuda")
    step = static_decode_step(model, tokens[:, :32], tokens[:, 32:])
    eager = step().clone()
    replay = capture_graph(step, torch.device("cuda"))
    for _ in range(2):
        replay().fill_(float("nan"))  # the next replay must rewrite the logits
        assert rel_err(replay().float(), eager.float()) < 1e-3
    assert rel_err(step().float(), eager.float()) < 1e-3  # every replay rewound the cache


@pytest.mark.parametrize("arch,overrides", [
    ("deepseek_v2", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64,
                         qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)),  # latent attention absorbed
    ("qwen3_moe", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32)),  # GQA packed
])
def test_decode_attention_on_the_gpu_matches_the_float32_forward_and_replays(arch, overrides):
    """``use_decode_attention`` on bf16 CUDA: its decode step is as close to the float32 full forward as
    transformers' own SDPA step, and replays as a CUDA graph."""
    from hare.bench.model import static_decode_step
    from hare.models.attention import use_decode_attention

    model = tiny_model(arch, **overrides).cuda().requires_grad_(False)
    tokens = torch.randint(4, 90, (3, 40), device="cuda")
    with torch.no_grad():
        ref = model(tokens).logits[:, -1].float()
    model = model.to(torch.bfloat16)
    stock = static_decode_step(model, tokens[:, :39], tokens[:, 39:])()[:, -1].float()
    assert use_decode_attention(model)
    step = static_decode_step(model, tokens[:, :39], tokens[:, 39:])
    ours = step()[:, -1].float()
    assert rel_err(ours, ref) < max(2 * rel_err(stock, ref), 1e-2)
    eager = step().clone()
    replay = capture_graph(step, torch.device("cuda"))
    replay().fill_(float("nan"))
    assert rel_err(replay().float(), eager.float()) < 1e-3
