"""``hare info``: what this machine offers Hare (torch, CUDA, GPUs, nvcc, kernel cache) and which path each MoE
layer of a checkpoint takes here (the Hopper kernels, the grouped GEMM or the reference path, and why)."""

from __future__ import annotations

import platform
from importlib.metadata import version as package_version

import torch


def environment() -> list[tuple[str, str]]:
    """(item, state) rows describing this machine, as far as Hare is concerned."""
    from .gpu import _build, availability

    rows = [("hare", package_version("hare")), ("python", platform.python_version()),
            ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"),
            ("transformers", package_version("transformers")),
            ("CUDA available", str(torch.cuda.is_available()))]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(i)
        ok, why = availability(torch.device("cuda", i))
        rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)}, sm_{major}{minor}; Hopper kernels: "
                                  f"{'yes' if ok else 'no (' + why + ')'}"))
    nvcc = _build.find_nvcc()
    if nvcc is None:
        rows.append(("nvcc", "not found (set CUDA_HOME or HARE_NVCC)"))
    else:
        release = [line for line in _build._nvcc_version(nvcc).splitlines() if "release" in line]
        rows.append(("nvcc", f"{nvcc} ({release[-1].strip() if release else 'version unknown'})"))
    cache = _build.cache_dir()
    cubins = sorted(cache.glob("*.cubin")) if cache.is_dir() else []
    current = nvcc is not None and any(_build.cache_key(nvcc) in p.name for p in cubins)
    rows.append(("kernel cache", f"{cache}: {len(cubins)} cubin(s), "
                                 f"{sum(p.stat().st_size for p in cubins) / 2**20:.1f} MiB; current sources "
                                 f"{'built' if current else 'not built (compiled at first use)'}"))
    return rows


def layer_paths(model) -> list[tuple[str, str, str, str]]:
    """(layer, weights, path, why) for every Hare experts module of a loaded model, on its device and dtype."""
    from .models.experts import HareExperts
    from .moe import backend

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, HareExperts):
            w_gate_up, w_down = m.weight("gate_up"), m.weight("down")
            x = torch.empty(1, m.hidden_dim, dtype=model.dtype, device=w_gate_up.device)  # as the layer's input
            weights = "dense" if not m.sparse else "{bn}:{bm} bw{bw}".format(**m.sparsity)
            path, why = backend(x, w_gate_up, w_down, m.activation)
            rows.append((name, weights, path, why))
    return rows
