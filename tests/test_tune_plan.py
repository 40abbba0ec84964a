"""scripts/tune_plan.py's CPU half: the overrides it sweeps are ones the plan accepts, and its repeated weights are
the pruned experts repeated (so its timings are of real Block N:M weights)."""

import importlib.util
from pathlib import Path

import torch

from hare.gpu.plan import DEFAULT_CONFIG, WeightFormat, plan_moe

_spec = importlib.util.spec_from_file_location("tune_plan", Path(__file__).parents[1] / "scripts" / "tune_plan.py")
tune_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune_plan)


def test_every_swept_override_plans():
    gu, dn = WeightFormat.of(2048), WeightFormat.of(768)
    for T in (1, 128, 129, 2048):
        names = [name for name, _ in tune_plan.configs(T)]
        assert names[0] == "default" and len(names) == len(set(names))
        assert any(n.startswith("splits=") for n in names) == (T <= tune_plan.SPLIT_MAX_TOKENS)
        for name, cfg in tune_plan.configs(T):
            p = plan_moe(T, 8, 128, 2048, 768, gu, dn, "silu", True, 132, cfg)
            if cfg.tile_n is not None:
                assert p.tile_n == cfg.tile_n
            if cfg.raster is not None:
                assert p.gate_up.raster == p.down.raster == cfg.raster
            if cfg == DEFAULT_CONFIG:
                assert name == "default"


def test_repeated_experts_are_the_pruned_ones():
    w = torch.randn(2, 512, 256, generator=torch.Generator().manual_seed(0))
    for part in ("gate_up", "down"):
        b = tune_plan.repeated_blocknm(w, 0.25, 16, part, 5)
        assert tuple(b.shape) == (5, 512, 256) and abs(b.density - 0.25) < 1e-6
        dense = b.to_dense().float()
        for e in range(5):
            assert torch.equal(dense[e], dense[e % 2])
        assert not torch.equal(dense[0], dense[1])
        assert b.joint is not None  # pruned with the joint panels hare.patch uses
