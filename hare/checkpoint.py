"""``hare.save`` / ``hare.load``: BlockNM weights (and plain tensors) in safetensors files.

A Hare file is an ordinary safetensors file whose header metadata holds ``format = "hare"``, the format
``version``, per entry its kind, sparsity parameters and panel layout (``joint``, ``halves``) and, optionally, the caller's own string fields
(``load_metadata``; Hare model checkpoints record there which layer a file belongs to). A BlockNM entry ``name`` is stored as the tensors
``name.values``, ``name.meta`` and ``name.block_idx``; a plain tensor as ``name``. Loading checks everything (the
metadata, every tensor's shape, dtype and index range) and raises ``CheckpointError`` on a foreign or corrupt file.
Writes go to a temporary file in the target folder that is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .blocknm import BlockNM
from .errors import CheckpointError, HareError, InvalidArgumentError

FORMAT = "hare"
VERSION = 4  # 4: BlockNM entries record ``halves`` (3: without it, read as halves=False: the layout came with 4);
# 3: they record ``joint`` (2: without it, read as joint=None: joint panels came with 3);
# 2: BlockNM.meta in the sparse-wgmma register layout (1: one row of nibbles per weight row)
_READS = ("2", "3", str(VERSION))
_PARTS = ("values", "meta", "block_idx")
_SINGLE = "weight"  # entry name used when a single BlockNM is saved


def _describe(name: str, obj) -> tuple[dict, dict[str, torch.Tensor]]:
    if isinstance(obj, BlockNM):
        entry = {"kind": "blocknm", "shape": list(obj.shape), "bn": obj.bn, "bm": obj.bm, "bw": obj.bw,
                 "joint": obj.joint, "halves": obj.halves}
        return entry, {f"{name}.{p}": getattr(obj, p) for p in _PARTS}
    if isinstance(obj, torch.Tensor):
        return {"kind": "tensor"}, {name: obj}
    raise InvalidArgumentError(f"save: entry {name!r} is a {type(obj).__name__}; expected a BlockNM or a torch.Tensor")


def save(path, obj, metadata: dict[str, str] | None = None) -> None:
    """Write a BlockNM, or a dict of names to BlockNM / tensors, to ``path`` atomically; ``metadata`` (str -> str)
    is stored beside Hare's own and read back by ``load_metadata``."""
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise InvalidArgumentError("save: metadata must be a dict of str to str")
    single = not isinstance(obj, dict)
    items = {_SINGLE: obj} if single else obj
    entries, tensors = {}, {}
    for name, value in items.items():
        if not isinstance(name, str) or not name or any(name.endswith("." + p) for p in _PARTS):
            raise InvalidArgumentError(f"save: bad entry name {name!r}")
        entries[name], parts = _describe(name, value)
        clash = tensors.keys() & parts.keys()
        if clash:
            raise InvalidArgumentError(f"save: tensor names collide: {sorted(clash)}")
        tensors.update({k: v.detach().contiguous().cpu() for k, v in parts.items()})
    meta = {"format": FORMAT, "version": str(VERSION), "single": json.dumps(single), "entries": json.dumps(entries),
            "user": json.dumps(metadata or {})}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > min(100 * 2**20, path.stat().st_size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (bad header size)")
            header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file, but not a Hare file (no format={FORMAT!r} in its metadata)")
    if meta.get("version") == "1":
        raise CheckpointError(f"{path}: Hare format version 1, written by an older Hare with a different 2:4 metadata "
                              f"layout; this Hare reads version {VERSION}: re-run `hare sparsify` to rewrite it")
    if meta.get("version") not in _READS:
        raise CheckpointError(f"{path}: Hare format version {meta.get('version')!r}; this Hare reads versions "
                              f"{', '.join(_READS)}")
    return meta


def load_metadata(path) -> dict[str, str]:
    """The ``metadata`` a file was saved with (empty if none), reading only its header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        user = json.loads(_read_header(path).get("user", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed Hare metadata ({e})") from None
    if not isinstance(user, dict):
        raise CheckpointError(f"{path}: malformed Hare metadata (user fields are not a mapping)")
    return user


def load(path, device="cpu"):
    """Read a file written by ``save``: the BlockNM if one was saved, else the dict of entries."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    meta = _read_header(path)
    joint_recorded, halves_recorded = meta["version"] != "2", meta["version"] not in ("2", "3")
    try:
        entries = json.loads(meta["entries"])
        single = json.loads(meta["single"])
        tensors = load_file(path)
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed Hare metadata ({e})") from None
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt safetensors data ({e})") from None
    result = {}
    for name, entry in entries.items():
        try:
            if entry["kind"] == "tensor":
                result[name] = tensors.pop(name)
            elif entry["kind"] == "blocknm":
                parts = [tensors.pop(f"{name}.{p}") for p in _PARTS]
                w = BlockNM(*parts, shape=entry["shape"], bn=entry["bn"], bm=entry["bm"], bw=entry["bw"],
                            joint=entry["joint"] if joint_recorded else None,
                            halves=entry["halves"] if halves_recorded else False)
                w.check()
                result[name] = w
            else:
                raise CheckpointError(f"unknown kind {entry['kind']!r}")
        except KeyError as e:
            raise CheckpointError(f"{path}: entry {name!r} is missing {e}") from None
        except (HareError, TypeError) as e:
            raise CheckpointError(f"{path}: entry {name!r} is invalid: {e}") from None
    if tensors:
        raise CheckpointError(f"{path}: tensors not described by the metadata: {sorted(tensors)[:5]}")
    result = {k: v.to(device) for k, v in result.items()}
    return result[_SINGLE] if single else result
