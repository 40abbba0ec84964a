"""``hare.patch``: put Hare's experts into a transformers MoE model, in place, dense or pruned.

Only the experts modules are replaced (see ``architectures``), so the model's own routing stays exactly as it was.
Pruning goes layer by layer: a layer's dense expert weights are dropped as soon as its Block N:M copy exists, so
the model is never held twice. ``calibrate`` runs the model on calibration tokens and collects, per experts
module, the input-column norms that make the pruning activation-aware (Wanda's |w|·‖x_col‖), and with ``grams``
each expert's input Gram matrices for the reconstruction pruner (``hare.reconstruct``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocknm import expert_layout, halves_fit, sparsify
from ..calibration import activation_score, expert_input_grams, expert_input_norms
from ..distributed import shard_experts
from ..errors import InvalidArgumentError
from ..reconstruct import MIN_TOKENS, reconstruct
from .architectures import ExpertWeights, UnsupportedModelError, architecture_of, unsupported_message
from .experts import HareExperts
from .llama4 import hare_llama4_blocks


@dataclass
class Calibration:
    """Statistics of the experts' inputs on calibration tokens, per experts module (by its name in the model).

    norms:  name -> (E, hidden) and (E, ffn) input-column L2 norms of gate/up and of down.
    inputs: name -> (x, top_k_index, top_k_weights) the module saw; kept only when asked (to measure errors).
    grams:  name -> (E, hidden, hidden) and (E, ffn, ffn) float32 input Gram matrices XᵀX of gate/up and of down,
            and the rows routed to each expert (E,); collected only when asked (``method="reconstruct"``).
    """

    tokens: int = 0
    norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    grams: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def dense_experts(module) -> ExpertWeights:
    """The weights of a supported transformers experts module or a dense HareExperts, in Hare's layout; raises
    ``UnsupportedModelError`` for an experts module that hare.moe cannot compute."""
    if isinstance(module, HareExperts):
        if module.group is not None:
            raise InvalidArgumentError("hare.patch: this model's experts are already sharded over ranks")
        if module.sparse:
            raise InvalidArgumentError("hare.patch: this model is already pruned; patch the dense model instead")
        return ExpertWeights(module.weight("gate_up"), module.weight("down"), module.activation, **module.biases())
    return architecture_of(module).weights(module)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The experts modules Hare can replace, by name; raises ``UnsupportedModelError`` when there is none. Llama-4
    MoE blocks are first rewritten in place to route through dense Hare experts (``llama4``; same outputs)."""
    for name, block in hare_llama4_blocks(model):
        replace_module(model, name, block)
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, HareExperts) or architecture_of(m) is not None}
    if not found:
        raise UnsupportedModelError(unsupported_message(model))
    return found


def _refuse_unsupported(modules: dict[str, nn.Module]) -> None:
    """Raises for the first experts module hare.moe cannot compute, reading no weights: before any layer changes,
    so a model is never left half-patched."""
    for module in modules.values():
        if isinstance(module, HareExperts):
            dense_experts(module)
        else:
            architecture_of(module).activation(module)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


METHODS = ("magnitude", "activation", "reconstruct")


def _check_ratio_args(bn, bm, score, method, joint_panels) -> str | None:
    """The pruning method (None when dense): ``method``, or activation with a calibration and magnitude without."""
    if (bn is None) != (bm is None):
        raise InvalidArgumentError(f"hare.patch: give both bn and bm (for pruning) or neither (dense); got bn={bn}, bm={bm}")
    if score is not None and not isinstance(score, Calibration):
        raise InvalidArgumentError(f"score: expected None (magnitude) or a hare.models.Calibration from "
                                   f"hare.calibrate(model, ...), got {type(score).__name__}")
    if score is not None and bn is None:
        raise InvalidArgumentError("score: calibration statistics only matter when pruning; give bn and bm too")
    if method is not None and method not in METHODS:
        raise InvalidArgumentError(f"method: expected one of {METHODS}, got {method!r}")
    if method is not None and bn is None:
        raise InvalidArgumentError("method: only matters when pruning; give bn and bm too")
    if joint_panels is not None and not isinstance(joint_panels, bool):
        raise InvalidArgumentError(f"joint_panels: expected None or a bool, got {joint_panels!r}")
    if joint_panels and bn is None:
        raise InvalidArgumentError("joint_panels: only matters when pruning; give bn and bm too")
    if bn is None:
        return None
    method = method or ("magnitude" if score is None else "activation")
    if method != "magnitude" and score is None:
        raise InvalidArgumentError(f"method={method!r} needs calibration statistics: score=hare.calibrate(model, ids"
                                   f"{', grams=True' if method == 'reconstruct' else ''})")
    if method == "reconstruct" and not score.grams:
        raise InvalidArgumentError("method='reconstruct' needs the experts' Gram matrices: "
                                   "score=hare.calibrate(model, ids, grams=True)")
    return method


def _prune(name: str, method: str, weights, stats, bn: int, bm: int, bw: int, dtype, joint_panels: bool) -> list:
    """The two BlockNM weights (gate/up, down) of one experts module; ``stats`` are its norms (activation) or grams
    (reconstruct), on the weights' device."""
    layouts = [expert_layout(part, w.shape[-2], joint_panels) for part, w in zip(("gate_up", "down"), weights)]
    if method == "reconstruct":
        *grams, counts = stats
        pruned = [reconstruct(w, g, bn=bn, bm=bm, bw=bw, counts=counts, dtype=dtype, **lay)
                  for w, g, lay in zip(weights, grams, layouts)]
        fallback = sorted(set(pruned[0][1]) | set(pruned[1][1]))
        if fallback:
            warnings.warn(f"{name}: experts {fallback} were routed fewer than {MIN_TOKENS} calibration tokens; "
                          "pruned activation-aware instead of reconstructed")
        return [p[0] for p in pruned]
    scores = [None, None] if method == "magnitude" else [activation_score(w, n) for w, n in zip(weights, stats)]
    return [sparsify(w, bn=bn, bm=bm, bw=bw, score=s, dtype=dtype, **lay) for w, s, lay in zip(weights, scores, layouts)]


@torch.no_grad()
def patch(model: nn.Module, bn: int | None = None, bm: int | None = None, bw: int = 16,
          score: Calibration | None = None, progress: bool = False, ep_group=None,
          method: str | None = None, joint_panels: bool | None = None) -> nn.Module:
    """Replace, in place, the experts of a transformers MoE model by Hare's; returns the model.

    Without ``bn``/``bm`` the experts stay dense (same logits as before). With them every expert weight is pruned
    to Block N:M ``bn:bm`` with block width ``bw`` by ``method``: ``"magnitude"`` (the default without ``score``),
    ``"activation"`` (|w|·‖x_col‖, the default when ``score`` is a ``Calibration`` from ``hare.calibrate``) or
    ``"reconstruct"`` (``hare.reconstruct``: the kept weights updated to preserve each expert's outputs on the
    calibration tokens; needs ``hare.calibrate(..., grams=True)``). Values are stored in the model's dtype.
    Gate/up is stored in the halves panel layout (``hare.sparsify(..., halves=True)``: each of gate and up cut into
    panels from its own first row) when ffn is a multiple of 16. Joint panels prune gate/up with ``joint="halves"``
    (gate panel m and up panel m keep the same blocks; needs ffn a multiple of 16) and down with
    ``joint="adjacent"`` (see ``hare.sparsify``), so the kernels gather one token tile for both boxes of a tile:
    ``joint_panels=None`` (the default) uses them wherever the ffn admits them (their measured price on a trained
    model is nil, notes/joint_panels.md), True requires them, False lets every panel choose alone.

    With ``ep_group`` (a torch.distributed group, e.g. ``hare.ep_group()``), every rank keeps only its contiguous
    shard of each layer's experts (pruned after sharding, so each rank prunes only its own) and the layers run
    ``hare.ep_moe``; call it on every rank with the same model, then run each rank's own tokens.
    """
    method = _check_ratio_args(bn, bm, score, method, joint_panels)
    modules = experts_modules(model)
    _refuse_unsupported(modules)
    names = list(modules)
    if progress:
        from tqdm.auto import tqdm
        names = tqdm(names, desc="pruning experts" if bn else "patching experts", unit="layer")
    for name in names:
        dense = dense_experts(modules[name])
        w_gate_up, w_down, biases = dense.gate_up, dense.down, (dense.gate_up_bias, dense.down_bias)
        stats = None
        if method in ("activation", "reconstruct"):
            stats = (score.norms if method == "activation" else score.grams).get(name)
            if stats is None:
                raise InvalidArgumentError(f"score: the calibration has no statistics for {name!r}; run "
                                           "hare.calibrate on this model")
            stats = tuple(t.to(w_gate_up.device) for t in stats)
        if ep_group is not None:
            w_gate_up, w_down = shard_experts(w_gate_up, ep_group), shard_experts(w_down, ep_group)
            biases = tuple(None if b is None else shard_experts(b, ep_group) for b in biases)
            stats = None if stats is None else tuple(shard_experts(t, ep_group) for t in stats)
        if bn is None:
            new = HareExperts(w_gate_up, w_down, dense.activation, ep_group, *biases)
        else:
            joint = halves_fit(w_gate_up.shape[-2]) if joint_panels is None else joint_panels
            sparse = _prune(name, method, (w_gate_up, w_down), stats, bn, bm, bw, w_gate_up.dtype, joint)
            new = HareExperts(*sparse, dense.activation, ep_group, *biases)
        del w_gate_up, w_down, dense
        replace_module(model, name, new)
        modules[name] = None  # drop our reference so the dense weights can be freed now
    return model


@torch.no_grad()
def calibrate(model: nn.Module, input_ids: torch.Tensor, *, seq_len: int = 512, keep_inputs: bool = False,
              grams: bool = False) -> Calibration:
    """Run ``model`` on ``input_ids`` ((T,) or (B, T), cut into sequences of ``seq_len``) and collect each
    experts module's input-column norms (and, with ``keep_inputs``, the inputs themselves; with ``grams``, each
    expert's input Gram matrices, E·(hidden² + ffn²) float32 values per layer, on the model's device)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.numel() == 0:
        raise InvalidArgumentError("input_ids: expected a non-empty integer tensor of token ids")
    modules = experts_modules(model)
    calib = Calibration()
    squares: dict[str, list[torch.Tensor]] = {}

    _refuse_unsupported(modules)

    def hook_for(name, module):
        def hook(_, args):
            hidden, ids, weights = args[:3]
            x = hidden.reshape(-1, hidden.shape[-1])
            ids, weights = ids.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
            dense = dense_experts(module)  # per call: a transposed layout is copied, one layer at a time
            if grams:
                stats = expert_input_grams(x, ids, dense.gate_up, dense.activation, dense.gate_up_bias)
                total = calib.grams.get(name)
                calib.grams[name] = stats if total is None else tuple(a + b for a, b in zip(total, stats))
                n_in, n_hidden = (g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt() for g in stats[:2])
            else:
                n_in, n_hidden = expert_input_norms(x, ids, dense.gate_up, dense.activation, dense.gate_up_bias)
            acc = squares.setdefault(name, [torch.zeros_like(n_in, dtype=torch.float32),
                                            torch.zeros_like(n_hidden, dtype=torch.float32)])
            acc[0] += n_in.float().square()
            acc[1] += n_hidden.float().square()
            if keep_inputs:
                prev = calib.inputs.get(name)
                new = (x.detach().clone(), ids.detach().clone(), weights.detach().clone())
                calib.inputs[name] = new if prev is None else tuple(torch.cat(p) for p in zip(prev, new))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    try:
        device = next(model.parameters()).device
        rows = input_ids.reshape(-1) if input_ids.dim() == 1 else input_ids
        chunks = rows.split(seq_len) if rows.dim() == 1 else [r.split(seq_len) for r in rows]
        flat = list(chunks) if rows.dim() == 1 else [c for row in chunks for c in row]
        for chunk in flat:
            model(input_ids=chunk[None].to(device), use_cache=False)
            calib.tokens += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    calib.norms = {name: (a.sqrt(), b.sqrt()) for name, (a, b) in squares.items()}
    return calib
