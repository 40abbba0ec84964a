"""Expert shapes of real MoE models, shared by the benchmarks and the GPU tests: name -> (hidden, ffn, E, top-k).

The models of ``hare.models.configs.REAL`` (the end-to-end benchmark's) are read from those configs; the two
with the largest experts only the kernel benchmarks time are written here."""

from ..models.configs import REAL


def expert_shape(name: str) -> tuple[int, int, int, int]:
    """(hidden, ffn of one expert, experts, top-k) of a MoE layer of ``REAL[name]``."""
    _, config = REAL[name]
    experts = next(config[key] for key in ("num_local_experts", "num_experts", "n_routed_experts") if key in config)
    ffn = config.get("moe_intermediate_size", config["intermediate_size"])  # Mixtral's experts are its only FFN
    return config["hidden_size"], ffn, experts, config["num_experts_per_tok"]


MODEL_SHAPES = {
    "mixtral-8x7b": expert_shape("Mixtral-8x7B"),
    "mixtral-8x22b": (6144, 16384, 8, 2),
    "qwen3-30b-a3b": expert_shape("Qwen3-30B-A3B"),
    "deepseek-v2-lite": expert_shape("DeepSeek-V2-Lite"),
    "qwen1.5-moe-a2.7b": expert_shape("Qwen1.5-MoE-A2.7B"),
    "minicpm-moe-8x2b": (2304, 5760, 8, 2),
}
