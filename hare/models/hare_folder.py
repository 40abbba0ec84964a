"""Hare model checkpoints: a transformers checkpoint folder whose expert weights are Block N:M.

``sparsify_checkpoint`` reads a transformers folder (config + safetensors shards), prunes the experts of every MoE
layer (activation-aware with calibration text) and writes:

- every file of the source folder but the shards, as it was (config, tokenizer, generation config);
- each safetensors shard rewritten without its expert tensors, shard by shard (the others byte-for-byte values),
  and the shard index without them;
- one Hare file (``hare.save``) per MoE layer with its ``gate_up`` and ``down`` BlockNM weights, gate/up in the
  halves panel layout when ffn % 16 == 0 (as ``hare.patch`` prunes it; each weight records its layout), and, for
  models with expert biases, the dense ``gate_up_bias`` and ``down_bias``;
- ``hare_model.json``: format, version, sparsity (with ``joint_panels``: gate/up pruned with ``joint="halves"``,
  down with ``joint="adjacent"``) and which file holds which experts module. Each Hare file also
  records its layer and sparsity itself, so a swapped or stale file is caught.

Every argument is checked before the model loads. The folder is written beside ``out_dir`` under a temporary
name and renamed into place when complete (manifest last): a run that dies leaves nothing loadable in its way,
and the next run removes what a dead run left. Memory: the dense model is loaded once and pruned in place layer
by layer, shards are streamed one at a time. ``load_model`` loads such a folder, checking every file against the
manifest and the architecture, or a plain transformers folder (patched dense); it never lets transformers fill a
missing weight at random.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocknm import DENSITIES, JOINT_PANELS, check_ratio
from ..checkpoint import load as load_hare_file, load_metadata, save as save_hare_file
from ..errors import CheckpointError, InvalidArgumentError
from ..metrics import relative_error
from .experts import HareExperts
from .generation import load_tokenizer
from .patch import METHODS, calibrate, dense_experts, experts_modules, patch, replace_module

FORMAT = "hare-model"
VERSION = 3  # 3: records joint_panels (2: without it, read as False: joint panels came with 3);
# 2: each expert file records its layer and sparsity (1: only the manifest did)
MANIFEST = "hare_model.json"
INDEX = "model.safetensors.index.json"
EXPERT_FILES = "hare-experts-*.safetensors"
PARTIAL = ".partial-"  # a folder being written: .<out name>.partial-<pid>-<random>


def density_ratio(density: float) -> tuple[int, int]:
    """Block N:M ratio (bn, bm) of a supported density (bn / (2·bm))."""
    for d, ratio in DENSITIES.items():
        if abs(density - d) < 1e-9:
            return ratio
    raise InvalidArgumentError(f"density: expected one of {sorted(DENSITIES, reverse=True)} "
                               f"(Block N:M 1:1, 1:2, 1:5, 1:10 with 2:4 inside), got {density}")


def resolve_device(device) -> torch.device | None:
    """``device`` (None, a string or a torch.device) as a torch.device that exists here, else a clear error."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device: {device!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise InvalidArgumentError(f"device: {device!r} asked, but {why} (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"device: {device!r} asked, but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def is_expert_tensor(key: str) -> bool:
    """Checkpoint tensors of routed experts: fused (``…experts.gate_up_proj``) or per expert (``…experts.3.w1…``).
    Shared experts (``shared_expert(s).``) and routers are not."""
    return ".experts." in f".{key}" and ".shared_expert" not in key


def check_source(model_dir: Path) -> list[Path]:
    """The transformers weight shards of a checkpoint folder (Hare's expert files excluded), or a clear error."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such folder")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a transformers checkpoint folder (no config.json)")
    shards = sorted(set(model_dir.glob("*.safetensors")) - set(model_dir.glob(EXPERT_FILES)))
    if not shards:
        raise CheckpointError(f"{model_dir}: no .safetensors weights (only safetensors checkpoints are read)")
    return shards


def read_config(model_dir):
    """The transformers config of a checkpoint folder (cheap: no weights are read)."""
    from transformers import AutoConfig

    check_source(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}/config.json: transformers cannot read it ({e})") from None


def _load_transformers(model_dir: Path, device, dtype):
    """(model, loading info). transformers' own report is silenced: a Hare folder lacks the dense experts on
    purpose, and ``load_model`` checks that nothing else is missing."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto", output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{model_dir}: transformers could not load it: {e}") from None
    finally:
        logging.set_verbosity(verbosity)
    return (model.to(device) if device is not None else model), info


def calibration_ids(model_dir: Path, text: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text``; warns, with the real count, when the text is shorter."""
    ids = load_tokenizer(model_dir)(text, return_tensors="pt").input_ids[0]
    if ids.numel() < 2:
        raise InvalidArgumentError(f"calibration text: {ids.numel()} token(s); at least 2 are needed")
    if ids.numel() < tokens:
        warnings.warn(f"calibration text: {ids.numel()} tokens, fewer than the {tokens} asked; calibrating on "
                      f"{ids.numel()}")
    return ids[:tokens]


def expert_file_metadata(layer: str, density: float, bn: int, bm: int, bw: int) -> dict[str, str]:
    """What each Hare expert file of a model checkpoint records about itself (checked against the manifest)."""
    return {"layer": layer, "density": repr(float(density)), "bn": str(bn), "bm": str(bm), "bw": str(bw)}


@dataclass
class LayerReport:
    name: str
    rel_error: float
    dense_bytes: int
    sparse_bytes: int


def _remove_dead_partials(out_dir: Path) -> None:
    """Remove folders that runs which no longer exist left half-written beside ``out_dir``."""
    for stale in out_dir.parent.glob(f".{out_dir.name}{PARTIAL}*"):
        pid = stale.name[len(f".{out_dir.name}{PARTIAL}"):].partition("-")[0]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@torch.no_grad()
def sparsify_checkpoint(model_dir, out_dir, density: float, *, bw: int = 16, calib_text: str | None = None,
                        calib_tokens: int = 512, device=None, progress: bool = True, seed: int = 0,
                        method: str | None = None, joint_panels: bool | None = None) -> list[LayerReport]:
    """Prune ``model_dir`` into a Hare checkpoint in ``out_dir``; returns each MoE layer's relative output error on
    the calibration tokens (random token ids when no text is given; pruning is then by magnitude). ``method``
    (``hare.patch``'s: magnitude, activation or reconstruct) defaults to activation with text, magnitude without;
    ``joint_panels`` is ``hare.patch``'s (default: wherever the ffn admits them); the manifest records what was
    done."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    bn, bm = density_ratio(density)
    check_ratio(bn, bm, bw)
    if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < 2:
        raise InvalidArgumentError(f"calib_tokens: expected an int >= 2, got {calib_tokens!r}")
    method = method or ("activation" if calib_text is not None else "magnitude")
    if method not in METHODS:
        raise InvalidArgumentError(f"method: expected one of {METHODS}, got {method!r}")
    if method != "magnitude" and calib_text is None:
        raise InvalidArgumentError(f"method {method!r} needs calibration text (--calib)")
    if joint_panels is not None and not isinstance(joint_panels, bool):
        raise InvalidArgumentError(f"joint_panels: expected None or a bool, got {joint_panels!r}")
    device = resolve_device(device)
    shards = check_source(model_dir)
    if (model_dir / MANIFEST).exists() or any(model_dir.glob(EXPERT_FILES)):
        raise CheckpointError(f"{model_dir}: a Hare checkpoint (its experts are already pruned); pass the dense "
                              "transformers folder it was made from")
    if out_dir.resolve() == model_dir.resolve():
        raise InvalidArgumentError("OUT_DIR must differ from MODEL_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidArgumentError(f"{out_dir}: exists and is not empty")
    ids = calibration_ids(model_dir, calib_text, calib_tokens) if calib_text is not None else None

    model, _ = _load_transformers(model_dir, device, None)
    model.eval()
    modules = experts_modules(model)
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (calib_tokens,), generator=torch.Generator().manual_seed(seed))
    calib = calibrate(model, ids, keep_inputs=True, grams=method == "reconstruct")
    dense_out = {n: modules[n](*calib.inputs[n]) for n in modules}
    dense_bytes = {n: sum(p.numel() * p.element_size() for p in modules[n].parameters()) for n in modules}
    del modules
    patch(model, bn=bn, bm=bm, bw=bw, score=calib if method != "magnitude" else None, progress=progress,
          method=method, joint_panels=joint_panels)
    used = {m.layout["gate_up"]["joint"] is not None for m in experts_modules(model).values()}
    if len(used) > 1:
        raise InvalidArgumentError("joint panels fit some experts modules and not others (their ffn differ): pass "
                                   "joint_panels=False")
    joint_panels = used.pop()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL}{os.getpid()}-", dir=out_dir.parent))
    try:
        reports = _write_checkpoint(model, model_dir, work, shards, calib, dense_out, dense_bytes, progress,
                                    density=density, bn=bn, bm=bm, bw=bw, joint_panels=joint_panels,
                                    calibrated=calib_text is not None,
                                    criterion={"activation": "activation-aware"}.get(method, method))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; a folder that filled meanwhile makes this fail, not vanish
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return reports


def _write_checkpoint(model, model_dir: Path, out_dir: Path, shards, calib, dense_out, dense_bytes, progress, *,
                      density, bn, bm, bw, joint_panels: bool, calibrated: bool, criterion: str) -> list[LayerReport]:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    reports, files = [], {}
    for i, (name, module) in enumerate(experts_modules(model).items()):
        sparse_out = module(*calib.inputs[name]).double().flatten()
        ref = dense_out.pop(name).double().flatten()
        err = relative_error(sparse_out, ref)
        weights = module.blocknm_weights()
        files[name] = f"hare-experts-{i:05d}.safetensors"
        save_hare_file(out_dir / files[name], weights, metadata=expert_file_metadata(name, density, bn, bm, bw))
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
                "joint_panels": joint_panels,
                "calibration": {"source": "text" if calibrated else "random token ids", "tokens": calib.tokens,
                                "criterion": criterion},
                "experts": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return reports


def read_manifest(folder: Path) -> dict | None:
    """The checked manifest of a Hare folder (None for a plain transformers folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(manifest).__name__}")
    fmt, version = manifest.get("format"), manifest.get("version")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: format {fmt!r}; this Hare reads {FORMAT!r} version {VERSION}")
    if version == 1:
        raise CheckpointError(f"{path}: {FORMAT} version 1, written by an older Hare whose expert files do not "
                              f"record their layer; this Hare reads version {VERSION}: re-run `hare sparsify` on "
                              "the dense model")
    if version not in (2, VERSION):
        raise CheckpointError(f"{path}: {FORMAT} version {version!r}; this Hare reads versions 2 and {VERSION}")
    if version == 2:
        manifest = {**manifest, "joint_panels": False}
    for key, kinds in (("density", (int, float)), ("bn", (int,)), ("bm", (int,)), ("bw", (int,)),
                       ("joint_panels", (bool,)), ("experts", (dict,))):
        if key not in manifest:
            raise CheckpointError(f"{path}: no {key!r} field")
        if isinstance(manifest[key], bool) != (kinds == (bool,)) or not isinstance(manifest[key], kinds):
            raise CheckpointError(f"{path}: field {key!r} is {manifest[key]!r}; expected a "
                                  f"{' or '.join(k.__name__ for k in kinds)}")
    try:
        ratio = density_ratio(manifest["density"])
        check_ratio(manifest["bn"], manifest["bm"], manifest["bw"])
    except InvalidArgumentError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ratio != (manifest["bn"], manifest["bm"]):
        raise CheckpointError(f"{path}: density {manifest['density']} is Block {ratio[0]}:{ratio[1]}, but fields "
                              f"bn, bm say {manifest['bn']}:{manifest['bm']}")
    files = manifest["experts"]
    bad = [f for f in files.values() if not isinstance(f, str) or not Path(f).match(EXPERT_FILES) or Path(f).name != f]
    if bad or len(set(files.values())) != len(files):
        raise CheckpointError(f"{path}: field 'experts' must map each experts module to its own "
                              f"{EXPERT_FILES} file in the folder; got {bad[:3] or sorted(files.values())[:3]}")
    return manifest


def _check_expert_file(path: Path, name: str, manifest: dict) -> None:
    """The file's own record (layer, sparsity) against the manifest: reads the header only."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file ({MANIFEST} lists it for {name})")
    recorded = load_metadata(path)
    for key, want in expert_file_metadata(name, manifest["density"], manifest["bn"], manifest["bm"],
                                          manifest["bw"]).items():
        if recorded.get(key) != want:
            raise CheckpointError(f"{path}: {key} is {recorded.get(key)!r} in the file, {want!r} in {MANIFEST}")


def _load_expert_file(path: Path, module, manifest: dict, device) -> tuple[dict, str]:
    """The weights of one Hare file checked against the module they replace: entries, shapes, sparsity, finite
    values; and the module's activation."""
    weights = load_hare_file(path, device=device)
    dense = dense_experts(module)
    expected = {"gate_up": dense.gate_up, "down": dense.down,
                **{k: b for k, b in (("gate_up_bias", dense.gate_up_bias), ("down_bias", dense.down_bias))
                   if b is not None}}
    if not isinstance(weights, dict) or set(weights) != set(expected):
        raise CheckpointError(f"{path}: entries {sorted(weights) if isinstance(weights, dict) else 'one weight'}; "
                              f"this model's experts need {sorted(expected)}")
    for part, want in expected.items():
        w = weights[part]
        if tuple(w.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: {part} has shape {tuple(w.shape)}, the model's is {tuple(want.shape)}")
        if part in ("gate_up", "down"):
            sparsity = None if isinstance(w, torch.Tensor) else (w.bn, w.bm, w.bw)
            if sparsity != (manifest["bn"], manifest["bm"], manifest["bw"]):
                raise CheckpointError(f"{path}: {part} is {'dense' if sparsity is None else '%d:%d bw %d' % sparsity}"
                                      f", {MANIFEST} says {manifest['bn']}:{manifest['bm']} bw {manifest['bw']}")
            joint = JOINT_PANELS[part] if manifest["joint_panels"] else None
            if w.joint != joint:
                raise CheckpointError(f"{path}: {part} has joint={w.joint!r}, {MANIFEST} (joint_panels="
                                      f"{manifest['joint_panels']}) says joint={joint!r}")
        if not bool(torch.isfinite(w if isinstance(w, torch.Tensor) else w.values).all()):
            raise CheckpointError(f"{path}: {part} holds non-finite values (NaN or inf)")
    return weights, dense.activation


@torch.no_grad()
def load_model(folder, device=None, dtype=None):
    """A runnable model from a Hare checkpoint folder (pruned experts), or from a plain transformers folder
    (patched dense). ``device`` is a torch device (default: where transformers puts it, the CPU). Every expert file
    is checked against the manifest and the architecture; any weight missing from the folder is an error."""
    folder = Path(folder)
    device = resolve_device(device)
    check_source(folder)
    manifest = read_manifest(folder)
    on_disk = {p.name for p in folder.glob(EXPERT_FILES)}
    if manifest is None and on_disk:
        raise CheckpointError(f"{folder}: Hare expert files ({sorted(on_disk)[0]}, …) but no {MANIFEST}: an "
                              "incomplete `hare sparsify` output; sparsify the dense model again")
    if manifest is not None:
        unlisted = on_disk - set(manifest["experts"].values())
        if unlisted:
            raise CheckpointError(f"{folder}: {sorted(unlisted)[0]} is not listed in {MANIFEST}")
        for name, file in manifest["experts"].items():
            _check_expert_file(folder / file, name, manifest)
    model, info = _load_transformers(folder, device, dtype)
    model.eval()
    modules = experts_modules(model)
    missing = sorted(k for k in info.get("missing_keys", ())
                     if manifest is None or not any(k.startswith(n + ".") for n in modules))
    if missing:
        raise CheckpointError(f"{folder}: weights missing from its shards (transformers would fill them at "
                              f"random): {missing[:5]}")
    if manifest is None:
        return patch(model)
    if set(manifest["experts"]) != set(modules):
        raise CheckpointError(f"{folder}: {MANIFEST} lists experts modules {sorted(manifest['experts'])[:3]}…, "
                              f"the model has {sorted(modules)[:3]}…")
    target = next(model.parameters()).device
    for name in list(modules):  # one layer at a time; the model is returned only if every file passes
        weights, activation = _load_expert_file(folder / manifest["experts"][name], modules[name], manifest, target)
        modules[name] = None  # drop our reference so the randomly initialised dense experts can be freed now
        replace_module(model, name, HareExperts(weights["gate_up"], weights["down"], activation, None,
                                                weights.get("gate_up_bias"), weights.get("down_bias")))
    return model
