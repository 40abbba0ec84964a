"""Hare model checkpoints: a transformers checkpoint folder whose expert weights are Block N:M.

``sparsify_checkpoint`` reads a transformers folder (config + safetensors shards), prunes the experts of every MoE
layer (activation-aware with calibration text) and writes:

- every file of the source folder but the shards, as it was (config, tokenizer, generation config);
- each safetensors shard rewritten without its expert tensors, shard by shard (the others byte-for-byte values),
  and the shard index without them;
- one Hare file (``hare.save``) per MoE layer with its ``gate_up`` and ``down`` BlockNM weights (and, for models
  with expert biases, the dense ``gate_up_bias`` and ``down_bias``);
- ``hare_model.json``: format, version, sparsity and which file holds which experts module.

Memory: the dense model is loaded once and pruned in place layer by layer, shards are streamed one at a time.
``load_model`` loads such a folder (or, for convenience, a plain transformers one, patched dense).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocknm import DENSITIES
from ..checkpoint import load as load_hare_file, save as save_hare_file
from ..errors import CheckpointError, InvalidArgumentError
from .experts import HareExperts
from .patch import calibrate, dense_experts, experts_modules, patch, replace_module

FORMAT = "hare-model"
VERSION = 1
MANIFEST = "hare_model.json"
INDEX = "model.safetensors.index.json"


def density_ratio(density: float) -> tuple[int, int]:
    """Block N:M ratio (bn, bm) of a supported density (bn / (2·bm))."""
    for d, ratio in DENSITIES.items():
        if abs(density - d) < 1e-9:
            return ratio
    raise InvalidArgumentError(f"density: expected one of {sorted(DENSITIES, reverse=True)} "
                               f"(Block N:M 1:1, 1:2, 1:5, 1:10 with 2:4 inside), got {density}")


def is_expert_tensor(key: str) -> bool:
    """Checkpoint tensors of routed experts: fused (``…experts.gate_up_proj``) or per expert (``…experts.3.w1…``).
    Shared experts (``shared_expert(s).``) and routers are not."""
    return ".experts." in f".{key}" and ".shared_expert" not in key


def _check_source(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such folder")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a transformers checkpoint folder (no config.json)")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{model_dir}: no .safetensors weights (only safetensors checkpoints are read)")
    return shards


def _load_transformers(model_dir: Path, device, dtype):
    """(model, loading info). transformers' own report is silenced: a Hare folder lacks the dense experts on
    purpose, and ``load_model`` checks that nothing else is missing."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto", output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: transformers could not load it: {e}") from None
    finally:
        logging.set_verbosity(verbosity)
    return (model.to(device) if device is not None else model), info


def calibration_ids(model_dir: Path, text: str, tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:tokens]
    if ids.numel() < 2:
        raise InvalidArgumentError("calibration text: fewer than 2 tokens")
    return ids


@dataclass
class LayerReport:
    name: str
    rel_error: float
    dense_bytes: int
    sparse_bytes: int


@torch.no_grad()
def sparsify_checkpoint(model_dir, out_dir, density: float, *, bw: int = 16, calib_text: str | None = None,
                        calib_tokens: int = 512, device=None, progress: bool = True, seed: int = 0) -> list[LayerReport]:
    """Prune ``model_dir`` into a Hare checkpoint in ``out_dir``; returns each MoE layer's relative output error on
    the calibration tokens (random token ids when no text is given; pruning is then by magnitude)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    bn, bm = density_ratio(density)
    shards = _check_source(model_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise InvalidArgumentError("OUT_DIR must differ from MODEL_DIR")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidArgumentError(f"{out_dir}: exists and is not empty")
    model, _ = _load_transformers(model_dir, device, None)
    model.eval()
    modules = experts_modules(model)

    if calib_text is not None:
        ids = calibration_ids(model_dir, calib_text, calib_tokens)
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (min(calib_tokens, 256),), generator=gen)
    calib = calibrate(model, ids, keep_inputs=True)
    dense_out = {n: modules[n](*calib.inputs[n]) for n in modules}
    dense_bytes = {n: sum(p.numel() * p.element_size() for p in modules[n].parameters()) for n in modules}
    del modules
    patch(model, bn=bn, bm=bm, bw=bw, score=calib if calib_text is not None else None, progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    reports, files = [], {}
    for i, (name, module) in enumerate(experts_modules(model).items()):
        sparse_out = module(*calib.inputs[name]).double().flatten()
        ref = dense_out.pop(name).double().flatten()
        err = float((sparse_out - ref).norm() / ref.norm().clamp_min(1e-30))
        weights = module.blocknm_weights()
        files[name] = f"hare-experts-{i:05d}.safetensors"
        save_hare_file(out_dir / files[name], weights)
        reports.append(LayerReport(name, err, dense_bytes[name], sum(w.nbytes for w in weights.values())))

    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, MANIFEST):
            shutil.copy2(f, out_dir / f.name)
    kept_keys = {}
    for shard in (tqdm(shards, desc="copying non-expert weights", unit="shard") if progress else shards):
        with safe_open(shard, "pt") as f:
            keys = [k for k in f.keys() if not is_expert_tensor(k)]
            tensors = {k: f.get_tensor(k) for k in keys}
            metadata = f.metadata()
        if tensors:
            save_file(tensors, out_dir / shard.name, metadata=metadata)
            kept_keys.update({k: shard.name for k in keys})
        del tensors
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        index["weight_map"] = kept_keys
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    manifest = {"format": FORMAT, "version": VERSION, "density": density, "bn": bn, "bm": bm, "bw": bw,
                "calibration": {"source": "text" if calib_text is not None else "random token ids",
                                "tokens": calib.tokens, "criterion": "activation-aware" if calib_text is not None
                                else "magnitude"},
                "experts": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return reports


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                              f"this Hare reads {FORMAT!r} version {VERSION}")
    return manifest


@torch.no_grad()
def load_model(folder, device=None, dtype=None):
    """A runnable model from a Hare checkpoint folder (pruned experts), or from a plain transformers folder
    (patched dense). ``device`` is a torch device (default: where transformers puts it, the CPU)."""
    folder = Path(folder)
    _check_source(folder)
    manifest = read_manifest(folder)
    model, info = _load_transformers(folder, device, dtype)
    model.eval()
    modules = experts_modules(model)
    if manifest is None:
        return patch(model)
    missing = [k for k in info.get("missing_keys", ()) if not any(k.startswith(n + ".") for n in modules)]
    if missing:
        raise CheckpointError(f"{folder}: weights missing from the shards: {sorted(missing)[:5]}")
    if set(manifest["experts"]) != set(modules):
        raise CheckpointError(f"{folder}: {MANIFEST} lists experts modules {sorted(manifest['experts'])[:3]}…, "
                              f"the model has {sorted(modules)[:3]}…")
    for name, module in modules.items():
        path = folder / manifest["experts"][name]
        weights = load_hare_file(path, device=next(model.parameters()).device)
        dense = dense_experts(module)
        expected = {"gate_up": dense.gate_up, "down": dense.down,
                    **{k: b for k, b in (("gate_up_bias", dense.gate_up_bias), ("down_bias", dense.down_bias))
                       if b is not None}}
        if set(weights) != set(expected):
            raise CheckpointError(f"{path}: entries {sorted(weights)}; this model's experts need {sorted(expected)}")
        for part, want in expected.items():
            if tuple(weights[part].shape) != tuple(want.shape):
                raise CheckpointError(f"{path}: {part} has shape {tuple(weights[part].shape)}, the model's is "
                                      f"{tuple(want.shape)}")
        activation = dense.activation
        del dense, expected
        replace_module(model, name, HareExperts(weights["gate_up"], weights["down"], activation, None,
                                                weights.get("gate_up_bias"), weights.get("down_bias")))
    return model

