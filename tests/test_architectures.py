"""Experts modules as modules: every standard experts class of the installed transformers is computed exactly by
Hare (float64, random weights and biases, dense patch of the module) or refused with UnsupportedModelError; and
the layout flags and gate probing behind that, on synthetic modules."""

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers.configuration_utils import PreTrainedConfig
from transformers.integrations.moe import use_experts_implementation

from hare.models import ARCHITECTURES, HareExperts, UnsupportedModelError, patch
from hare.models.configs import tiny_model
from hare.models.patch import dense_experts

from helpers import SMALL, rel_error, small_causal_lm


def _standard_classes() -> list[tuple[str, str]]:
    """(modeling module, class) of every experts class declared with use_experts_implementation."""
    root = Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        for name in re.findall(r"@use_experts_implementation[^\n]*\nclass (\w+)\(", path.read_text()):
            found.append((f"transformers.models.{path.parent.name}.{path.stem}", name))
    return found


CLASSES = _standard_classes()


def _small_module(module_name: str, class_name: str) -> nn.Module:
    """The experts class built from its package's configs with small sizes, in float64."""
    cls = getattr(importlib.import_module(module_name), class_name)
    package = importlib.import_module(module_name.rsplit(".", 1)[0])
    configs = [c for mod in [importlib.import_module(f"{package.__name__}.{p.stem}")
                             for p in Path(package.__file__).parent.glob("configuration_*.py")]
               for c in vars(mod).values()
               if inspect.isclass(c) and issubclass(c, PreTrainedConfig) and c is not PreTrainedConfig]
    # a class whose config holds per-modality sizes (lists) takes its own size as an argument
    kwargs = {"intermediate_size": 24} if "intermediate_size" in inspect.signature(cls.__init__).parameters else {}
    tried = []
    for config_class in sorted(set(configs), key=lambda c: ("Text" not in c.__name__, c.__name__)):
        try:
            config = config_class()
            for key, value in SMALL.items():
                if hasattr(config, key):
                    old = getattr(config, key)
                    setattr(config, key, [value] * len(old) if isinstance(old, list) else value)
            with torch.device("meta"):
                size = sum(p.numel() for p in cls(config, **kwargs).parameters())
            if size <= 4 * 10**6:
                return cls(config, **kwargs).double()
            tried.append(f"{config_class.__name__}: {size} parameters")
        except Exception as e:  # noqa: BLE001 - a config that does not build this class: try the next
            tried.append(f"{config_class.__name__}: {type(e).__name__}")
    raise AssertionError(f"{class_name}: no small instance from {tried}")


def test_the_scan_finds_the_named_architectures():
    names = {c for _, c in CLASSES}
    assert len(names) >= 20
    assert {"MixtralExperts", "Qwen3MoeExperts", "DeepseekV3Experts", "GptOssExperts"} <= names
    assert {a.experts_class for a in ARCHITECTURES} - {"DbrxExperts", "Llama4TextExperts"} <= names  # not standard


@pytest.mark.parametrize("module_name,class_name", CLASSES, ids=[c for _, c in CLASSES])
def test_standard_experts_class_is_computed_exactly_or_refused(module_name, class_name):
    module = _small_module(module_name, class_name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        try:
            dense = dense_experts(module)
        except UnsupportedModelError as e:
            assert class_name in str(e)
            return
        experts, _, hidden = dense.gate_up.shape
        x = torch.randn(9, hidden, dtype=torch.float64, generator=gen) * 3
        ids = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(9)])
        weights = torch.rand(9, 2, dtype=torch.float64, generator=gen)
        ref = module(x, ids, weights)
        ours = HareExperts(dense.gate_up, dense.down, dense.activation, None, dense.gate_up_bias,
                           dense.down_bias)(x, ids, weights)
    # float64 throughout, except where the module computes its gate in float32 itself
    assert rel_error(ours, ref) < 1e-6, (class_name, dense.activation)


@use_experts_implementation(is_transposed=True, has_bias=True, is_concatenated=False)
class _ClampedInterleaved(nn.Module):
    """Transposed, interleaved and biased, with a SiLU gate clamped at 1000: far past where a narrow probe looks."""

    limit = 1000.0

    def __init__(self, config, act_fn=None):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.act_fn = act_fn
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 2 * 8, generator=gen, dtype=torch.float64))
        self.gate_up_proj_bias = nn.Parameter(torch.randn(3, 2 * 8, generator=gen, dtype=torch.float64))
        self.down_proj = nn.Parameter(torch.randn(3, 8, 16, generator=gen, dtype=torch.float64))
        self.down_proj_bias = nn.Parameter(torch.randn(3, 16, generator=gen, dtype=torch.float64))

    def _apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return torch.nn.functional.silu(gate.clamp(max=self.limit)) * up.clamp(-self.limit, self.limit)

    def forward(self, hidden, ids, weights):  # per token and slot, as the layout flags describe
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for j, e in enumerate(ids[t].tolist()):
                h = self._apply_gate(hidden[t] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e])
                out[t] += weights[t, j] * (h @ self.down_proj[e] + self.down_proj_bias[e])
        return out


def test_layout_flags_and_a_far_clamp_are_read_exactly():
    module = _ClampedInterleaved(PreTrainedConfig())
    dense = dense_experts(module)
    assert dense.activation == "clamped-silu:limit=1000.0"
    assert dense.gate_up.shape == (3, 16, 16) and dense.down.shape == (3, 16, 8)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 16, dtype=torch.float64, generator=gen) * 300  # gate values well past the clamp
    ids, weights = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]]), torch.rand(5, 2, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x, ids, weights)
        ours = HareExperts(dense.gate_up, dense.down, dense.activation, None, dense.gate_up_bias,
                           dense.down_bias)(x, ids, weights)
    assert rel_error(ours, ref) < 1e-12


class ExactGelu(_ClampedInterleaved):
    def _apply_gate(self, gate_up):
        return torch.nn.functional.gelu(gate_up[..., ::2]) * gate_up[..., 1::2]


def test_a_gate_hare_does_not_compute_is_refused_by_name_before_any_layer_is_replaced():
    with pytest.raises(UnsupportedModelError, match="ExactGelu's gated unit is none of Hare's"):
        dense_experts(ExactGelu(PreTrainedConfig()))
    model = tiny_model("qwen3_moe")
    model.model.layers[1].mlp.experts = ExactGelu(PreTrainedConfig())
    with pytest.raises(UnsupportedModelError, match="ExactGelu"):
        patch(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


def test_every_causal_lm_with_standard_experts_patches_to_its_own_logits_or_is_refused():
    """Model level, beyond ARCHITECTURES: each causal-LM type whose package declares standard experts and that
    builds and runs at small sizes has the same logits after ``patch`` (float32), or is refused by name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    packages = {m.split(".")[2] for m, _ in CLASSES}
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    patched, refused, wrong = [], [], []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            package = type(transformers.AutoConfig.for_model(model_type)).__module__.split(".")[2]
        except Exception:  # noqa: BLE001 - model types whose config needs arguments
            continue
        model = small_causal_lm(model_type) if package in packages else None
        if model is None:
            continue
        try:
            with torch.no_grad():
                ref = model(ids).logits
        except Exception:  # noqa: BLE001 - the unpatched model itself does not run at these sizes
            continue
        try:
            with torch.no_grad():
                err = rel_error(patch(model)(ids).logits, ref)
        except UnsupportedModelError:
            refused.append(model_type)
            continue
        (patched if err < 1e-5 else wrong).append((model_type, err))
    assert not wrong, wrong
    assert len(patched) >= 25, (patched, refused)
