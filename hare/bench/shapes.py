"""Expert shapes of real MoE models, shared by the benchmarks and the GPU tests: name -> (hidden, ffn, E, top-k)."""

MODEL_SHAPES = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "mixtral-8x22b": (6144, 16384, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4),
    "minicpm-moe-8x2b": (2304, 5760, 8, 2),
}
