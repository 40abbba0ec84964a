"""Hopper (sm_90a) fast path of hare.moe for bf16 expert weights, dense or Block N:M sparse.

Public entry points:

* :func:`availability` -- whether the kernels can run on a device (sm_90 GPU, nvcc, cuda-bindings).
* :func:`unsupported` -- why the kernels do not take a layer's arguments (None when they do).
* :func:`build_layout` -- the routing layout of :func:`hare.routing.route`, built on the GPU with no host sync
  (two kernel launches; capturable in a CUDA graph; every shape fixed by tokens, top-k and experts).
* :func:`fused_moe` -- the routed expert MLP: gate/up GEMM with the token gather, the expert bias and the gated
  unit fused (SwiGLU, GELU, clamped SiLU, GPT-OSS's clamped SwiGLU), then the down GEMM with the expert bias, the
  routing weight, the return to token order and the top-k sum fused. Dense bf16 weights run
  on wgmma; Block N:M (``hare.BlockNM``) weights run on the sparse tensor cores (``wgmma.mma_async.sp``), looping
  only over each 128-row panel's kept K blocks.
* :class:`LaunchConfig` -- overrides of the launch plan (``plan.py``) for benchmarks and tests.

A call reads top to bottom: ``fused_moe`` checks its arguments (the same pass ``hare.moe`` runs, once), asks
``plan.plan_moe`` for the launches (pure Python from shapes, cached), allocates the workspace the plan sizes and
launches the kernels (``_launch``: the driver API through cuda-bindings, imported lazily so this package imports on
a CPU-only machine). Kernels are CUDA C++ in ``csrc``, compiled at first use for sm_90a and cached (``_build``).
Both ops are torch.library custom ops (``torch.ops.hare.*``), so they run under torch.compile and inside CUDA
graphs (call each once before capture: the first call loads the kernels).

Determinism: ``fused_moe(..., deterministic=True)`` (the default) writes every (token, slot) row of the down
GEMM to a buffer and sums the top-k rows in slot order in a separate pass, so results are bitwise identical from
run to run and independent of scheduling. ``deterministic=False`` accumulates the rows with fp32 vector atomics
instead (order-dependent rounding). The default is deterministic because reproducible serving and tests matter
more than the small difference measured in notes/kernels.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..blocknm import PANEL, BlockNM
from ..errors import InvalidArgumentError
from ..routing import DEFAULT_BLOCK, RoutingLayout, max_blocks, route
from .plan import (COMBINE_PARAMS, DEFAULT_CONFIG, FUSED_ACTIVATIONS, GEMM_PARAMS, GLU_COMBINE_PARAMS, K_ALIGN,
                   LAYOUT_PARAMS, LAYOUT_TILE_ITEMS, SMALL_THREADS, GEMM_THREADS, LaunchConfig, LayoutPlan,
                   WeightFormat, choose_block_n, gated_unit, layout_plan, plan_moe)

__all__ = ["availability", "unsupported", "build_layout", "fused_moe", "LaunchConfig", "choose_block_n",
           "FUSED_ACTIVATIONS", "K_ALIGN"]


@functools.lru_cache(maxsize=None)
def _availability(index: int) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if index >= torch.cuda.device_count():
        return False, f"no CUDA device {index}"
    cap = torch.cuda.get_device_capability(index)
    if cap != (9, 0):
        name = torch.cuda.get_device_name(index)
        return False, f"{name} is sm_{cap[0]}{cap[1]}; the Hare kernels need sm_90 (H100/H200)"
    from . import _build

    if _build.find_nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME or HARE_NVCC): the kernels are compiled at first use"
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False, "cuda-bindings is not installed (pip install cuda-bindings)"
    return True, "ok"


def availability(device=None) -> tuple[bool, str]:
    """(True, "ok") when the kernels can run on ``device`` (default: the current CUDA device), else (False, why)."""
    if device is None:
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device {device} is not a CUDA device"
    return _availability(device.index if device.index is not None else torch.cuda.current_device())


def unsupported(x: torch.Tensor, w_gate_up, w_down, activation: str) -> str | None:
    """Why the kernels do not compute a layer whose arguments passed ``hare.moe``'s checks, or None when they do:
    bf16 CUDA tensors, a fused gated unit, hidden and ffn multiples of 64 (and under a Block N:M gate/up, ffn a
    multiple of 128 or the weight sparsified with ``halves=True``, so gate panel m and up panel m cover the same
    ffn columns), on a device where they run. Expert biases (any float dtype) are always taken."""
    if not x.is_cuda:
        return f"tensors on {x.device}"
    why = _contract(x, w_gate_up, w_down, activation)
    if why is not None:
        return why
    ok, why = availability(x.device)
    return None if ok else why


def _contract(x: torch.Tensor, w_gate_up, w_down, activation: str) -> str | None:
    """The part of ``unsupported`` that reads shapes and dtypes alone (so torch.compile traces it)."""
    try:
        gated_unit(activation)
    except InvalidArgumentError as e:
        return str(e)
    if x.dtype != torch.bfloat16:
        return f"the Hopper kernels take bfloat16, got {x.dtype}"
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != torch.bfloat16:
            return f"the Hopper kernels take bfloat16 {name}{' values' if isinstance(w, BlockNM) else ''}, got {w.dtype}"
    hidden, ffn = x.shape[1], w_down.shape[2]
    if hidden % K_ALIGN or ffn % K_ALIGN:
        return f"hidden {hidden} and ffn {ffn} must be multiples of {K_ALIGN} for the Hopper kernels"
    if isinstance(w_down, BlockNM) and w_down.halves and (hidden // 2) % PANEL:
        return (f"a Block N:M w_down in the halves layout with hidden {hidden} (hidden/2 not a multiple of {PANEL}) "
                "has panels the down kernel does not read: sparsify it with halves=False")
    if isinstance(w_gate_up, BlockNM) and ffn % PANEL and not w_gate_up.halves:
        return (f"ffn {ffn} is not a multiple of {PANEL}, so a panel of this Block N:M gate/up mixes gate and up "
                "rows, which the Hopper kernels do not take: sparsify it with halves=True (hare.patch and `hare "
                "sparsify` do)")
    return None


# ------------------------------------------------------------------------------------------- layout
def _prep_ids(topk_ids: torch.Tensor) -> torch.Tensor:
    ids = topk_ids if topk_ids.dtype in (torch.int32, torch.int64) else topk_ids.to(torch.int32)
    return ids if ids.is_contiguous() else ids.contiguous()


def _launch_layout(mod, stream: int, pdl: bool, ids: torch.Tensor, E: int, block: int, R: int, slots: int,
                   lay: LayoutPlan, base_ptr: int) -> None:
    """The layout kernels, writing the fields of `lay` into the int32 buffer at base_ptr."""
    from . import _launch

    p = _launch.params(LAYOUT_PARAMS, ids.data_ptr(), *(base_ptr + 4 * o for o in lay.offsets), mod.ticket.data_ptr(),
                       1 if ids.dtype == torch.int64 else 0, R, ids.shape[1], E, block, slots, LAYOUT_TILE_ITEMS,
                       lay.num_tiles)
    for k in (lay.count, lay.scatter):
        if k is not None:
            mod.launch(k.kernel, k.grid, SMALL_THREADS, k.smem, stream, pdl, p)


def layout_into(topk_ids: torch.Tensor, num_experts: int, block: int) -> list[torch.Tensor]:
    """Build the layout of hare.routing.route on the GPU (two launches, no host sync) into views of one int32
    buffer: [counts, offsets, gather_index, row_assignment, assignment_row, block_expert, block_start,
    block_height, num_blocks] (the per-tile workspace follows them)."""
    from . import _launch

    T, k = topk_ids.shape
    R, E = T * k, num_experts
    slots = max_blocks(R, E, block)
    lay = layout_plan(R, E, slots)
    buf = torch.empty(lay.total, dtype=torch.int32, device=topk_ids.device)
    ends = (*lay.offsets[1:9], lay.offsets[8] + 1)
    outs = [buf[a:b] for a, b in zip(lay.offsets[:9], ends)]
    outs[8] = outs[8].view(())
    if R == 0:
        for o in (outs[0], outs[1], outs[8]):
            o.zero_()
        return outs
    if not lay.on_device:  # very large T*k*E: the torch-ops layout (whose id check syncs with the host when eager)
        ref = route(topk_ids, E, block)
        for o, f in zip(outs, (ref.counts, ref.offsets, ref.gather_index, ref.row_assignment, ref.assignment_row,
                               ref.block_expert, ref.block_start, ref.block_height, ref.num_blocks)):
            o.copy_(f.reshape(o.shape))
        return outs
    mod = _launch.module(topk_ids.device)
    _launch_layout(mod, _launch.current_stream(topk_ids.device), True, _prep_ids(topk_ids), E, block, R, slots, lay,
                   buf.data_ptr())
    return outs


def _to_layout(tensors: list[torch.Tensor], T: int, k: int, E: int, block: int) -> RoutingLayout:
    (counts, offsets, gather_index, row_assignment, assignment_row, block_expert, block_start, block_height,
     num_blocks) = tensors
    return RoutingLayout(
        num_tokens=T, top_k=k, num_experts=E, block=block, counts=counts, offsets=offsets,
        gather_index=gather_index, row_assignment=row_assignment, assignment_row=assignment_row,
        block_expert=block_expert, block_start=block_start, block_height=block_height, num_blocks=num_blocks,
    )


def build_layout(topk_ids: torch.Tensor, num_experts: int, block: int = DEFAULT_BLOCK) -> RoutingLayout:
    """hare.routing.route on the GPU: same fields, same values; no host sync; CUDA-graph capturable.

    Ids are not range-checked on the device (that would need a sync); the kernel clamps them into
    [0, num_experts), so a bad id gives a wrong layout, never a bad address. The build uses a per-device ticket
    counter (reset by the kernel itself), so layouts must not be built concurrently on two streams of one device.
    """
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.is_floating_point():
        raise InvalidArgumentError("topk_ids: expected an integer tensor of shape (tokens, top_k)")
    if not topk_ids.is_cuda:
        raise InvalidArgumentError("topk_ids: expected a CUDA tensor")
    T, k = topk_ids.shape
    if torch.compiler.is_compiling():
        tensors = list(torch.ops.hare.build_layout(topk_ids, int(num_experts), int(block)))
    else:
        tensors = layout_into(topk_ids, int(num_experts), int(block))
    return _to_layout(tensors, T, k, int(num_experts), int(block))


# ------------------------------------------------------------------------------------------- fused MoE
class DeviceLayout(NamedTuple):
    """Device addresses of the layout fields the GEMMs read."""

    gather_index: int
    row_assignment: int
    block_expert: int
    block_start: int
    block_height: int
    num_blocks: int

    @staticmethod
    def of(lay: LayoutPlan, base_ptr: int) -> "DeviceLayout":
        return DeviceLayout(*(base_ptr + 4 * lay.offset(f) for f in DeviceLayout._fields))


def _weight_parts(w) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """(values or dense weight, meta, block_idx, bw): what the custom op takes of a dense tensor or a BlockNM."""
    if isinstance(w, BlockNM):
        return w.values, w.meta, w.block_idx, w.bw
    return w, None, None, 0


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up, w_down,
              activation: str = "silu", deterministic: bool = True, config: LaunchConfig | None = None,
              gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * (W_down[e] glu(W_gate[e] x_t + b_gate[e], W_up[e] x_t + b_up[e]) + b_down[e]),
    e = topk_ids[t,j], on the kernels.

    x (T, H) bf16; topk_ids (T, k) int; topk_weights (T, k) float; w_gate_up (E, 2F, H) (rows [0, F) gate,
    [F, 2F) up) and w_down (E, H, F), each a bf16 tensor or a stacked ``hare.BlockNM`` with bf16 values (the
    sparse kernels run on its compressed storage); optional float expert biases gate_up_bias (E, 2F) and
    down_bias (E, H) (added in fp32); ``activation`` one of ``FUSED_ACTIVATIONS``' units as ``hare.activations``
    names them ("gpt-oss:alpha=A,limit=L", ...); all on one sm_90 device; ``unsupported`` says what else the kernels
    need. Ids are not range-checked (``hare.moe`` does that unless told not to). ``config`` overrides the launch
    plan. Returns (T, H) bf16. ``deterministic`` (default True): see the module docstring.
    """
    from ..moe import check_moe_args

    check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, False, gate_up_bias, down_bias)
    # tracing for torch.compile reads no device facts (availability runs nvcc lookups): shapes and dtypes only
    why = _contract(x, w_gate_up, w_down, activation) if torch.compiler.is_compiling() else \
        unsupported(x, w_gate_up, w_down, activation)
    if why is not None:
        raise InvalidArgumentError(f"hare.gpu.fused_moe: {why}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not all(t.is_contiguous() for t in _weight_parts(w)[:3] if t is not None):
            raise InvalidArgumentError(f"{name}: expert weights must be contiguous")
    if config is not None and not isinstance(config, LaunchConfig):
        raise InvalidArgumentError(f"config: expected a hare.gpu.LaunchConfig, got {type(config).__name__}")
    return run_fused_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation, deterministic, config,
                         gate_up_bias, down_bias)


def _fp32(b: torch.Tensor | None) -> torch.Tensor | None:
    return b if b is None or (b.dtype == torch.float32 and b.is_contiguous()) else b.float().contiguous()


def run_fused_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str, deterministic: bool,
                  config: LaunchConfig | None = None, gate_up_bias=None, down_bias=None) -> torch.Tensor:
    """fused_moe on arguments already checked (``hare.moe`` calls this after its own pass; weights contiguous)."""
    c = config or DEFAULT_CONFIG
    args = (x, topk_ids, topk_weights, *_weight_parts(w_gate_up), *_weight_parts(w_down), _fp32(gate_up_bias),
            _fp32(down_bias), activation, bool(deterministic), c.tile_n or 0, c.gateup_splits or 0,
            c.down_splits or 0, c.raster or 0, c.programmatic_launch)
    if torch.compiler.is_compiling():
        return torch.ops.hare.fused_moe(*args)
    # eager (and CUDA-graph capture): skip the custom-op dispatcher, which costs ~80 us per call in eager mode
    return _fused_moe_impl(*args)


_plan = functools.lru_cache(maxsize=4096)(plan_moe)  # a plan is a pure function of its (hashable) arguments


def _fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, w_down, d_meta, d_block_idx,
                    d_bw, gate_up_bias, down_bias, activation: str, deterministic: bool, tile_n: int,
                    gateup_splits: int, down_splits: int, raster: int, programmatic_launch: bool):
    """Plan -> allocate -> launch. Each projection dense (meta None) or Block N:M (values, meta, block_idx, bw);
    biases fp32 contiguous or None."""
    from . import _launch

    T, H = x.shape
    E, F2, _ = w_gate_up.shape
    F, k, dev = F2 // 2, topk_ids.shape[1], x.device
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    if T == 0:
        return out
    mod = _launch.module(dev)
    stream, R = _launch.current_stream(dev), T * k
    gu = WeightFormat.of(H, gu_block_idx, gu_bw)
    dn = WeightFormat.of(F, d_block_idx, d_bw)
    config = LaunchConfig(tile_n or None, gateup_splits or None, down_splits or None, raster or None,
                          programmatic_launch)
    plan = _plan(T, k, E, H, F, gu, dn, activation, deterministic, mod.num_sms, config)
    pdl, n, slots = plan.programmatic_launch, plan.tile_n, plan.slots
    if plan.layout.on_device:
        lbuf = torch.empty(plan.layout.total, dtype=torch.int32, device=dev)
        _launch_layout(mod, stream, pdl, _prep_ids(topk_ids), E, n, R, slots, plan.layout, lbuf.data_ptr())
        lay = DeviceLayout.of(plan.layout, lbuf.data_ptr())
    else:
        fields = dict(zip(LayoutPlan.FIELDS, layout_into(topk_ids, E, n)))
        lay = DeviceLayout(*(fields[f].data_ptr() for f in DeviceLayout._fields))
    if not x.is_contiguous():
        x = x.contiguous()
    wts = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    if not wts.is_contiguous():
        wts = wts.contiguous()
    ws = torch.empty(plan.workspace_elements, dtype=torch.bfloat16, device=dev)
    h_ptr = ws.data_ptr()

    alpha, limit = plan.glu_args

    def gemm(launch, fmt, maps, block_idx, bias, b_src, out_ptr, split_stride, K, M, rows_per_expert, box1, m_tile,
             num_m, box1_panel_offset):
        p = _launch.params(GEMM_PARAMS, b_src, out_ptr, lay.gather_index, lay.row_assignment, wts.data_ptr(),
                           lay.block_expert, lay.block_start, lay.block_height, lay.num_blocks,
                           0 if block_idx is None else block_idx.data_ptr(), 0 if bias is None else bias.data_ptr(),
                           split_stride, K, M, rows_per_expert, box1, m_tile, num_m, launch.splits,
                           launch.k_per_split, k, R, launch.raster, fmt.k_stages, fmt.kept, fmt.bw_log2, fmt.panels,
                           box1_panel_offset, int(fmt.shared_b), E, slots, alpha, limit)
        mod.launch(launch.kernel, launch.grid, GEMM_THREADS, launch.smem, stream, pdl, *maps, p)

    def maps(w, meta, out_rows, K):
        if meta is None:
            return (_launch.weight_tensor_map(w, E * out_rows, K),)
        return _launch.sparse_tensor_maps(w, meta)

    # gate/up: h (R, F) = act(x[g] W_gate^T) * (x[g] W_up^T), expert-sorted rows; split: fp32 partials, then combine
    g = plan.gate_up
    gu_maps = maps(w_gate_up, gu_meta, F2, H)
    # box 1 is up panel m: panel P/2 + m (halves layout, or ffn a multiple of 128)
    gu_args = (gu_maps, gu_block_idx, gate_up_bias, x.data_ptr())
    gu_shape = (H, F, F2, F, 128, -(-F // 128), gu.panels // 2)
    if plan.glu_combine is None:
        gemm(g, gu, *gu_args, h_ptr, 0, *gu_shape)
    else:
        part = torch.empty(plan.partial_elements, dtype=torch.float32, device=dev)
        gemm(g, gu, *gu_args, part.data_ptr(), R * F2, *gu_shape)
        c = plan.glu_combine
        mod.launch(c.kernel, c.grid, SMALL_THREADS, c.smem, stream, pdl,
                   _launch.params(GLU_COMBINE_PARAMS, part.data_ptr(), h_ptr, R * F2, R, F, g.splits, alpha, limit))

    # down: y = (h W_down^T) * routing weight, back in token order
    d = plan.down
    d_maps = maps(w_down, d_meta, H, F)
    if deterministic:
        y_ptr = out.data_ptr() if plan.direct else h_ptr + 2 * R * F  # Y follows h in the workspace
        gemm(d, dn, d_maps, d_block_idx, down_bias, h_ptr, y_ptr, R * H, F, H, H, 128, 256, -(-H // 256), 1)
        if plan.combine is not None:
            c = plan.combine
            mod.launch(c.kernel, c.grid, SMALL_THREADS, c.smem, stream, pdl,
                       _launch.params(COMBINE_PARAMS, y_ptr, out.data_ptr(), R * H, T, H, k, d.splits))
    else:
        acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
        gemm(d, dn, d_maps, d_block_idx, down_bias, h_ptr, acc.data_ptr(), 0, F, H, H, 128, 256, -(-H // 256), 1)
        out.copy_(acc)
    return out


# ------------------------------------------------------------------------------------------- torch.library
@torch.library.custom_op("hare::build_layout", mutates_args=())
def _build_layout_op(
    topk_ids: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    # the op's outputs must not share storage: each field its own tensor
    return tuple(t.clone() for t in layout_into(topk_ids, num_experts, block))


@_build_layout_op.register_fake
def _build_layout_fake(topk_ids, num_experts, block):
    T, k = topk_ids.shape
    R = T * k
    B = max_blocks(R, num_experts, block)
    e = lambda *s: topk_ids.new_empty(s, dtype=torch.int32)  # noqa: E731
    return (e(num_experts), e(num_experts + 1), e(R), e(R), e(R), e(B), e(B), e(B), e())


@torch.library.custom_op("hare::fused_moe", mutates_args=())
def _fused_moe_op(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up: torch.Tensor,
    gu_meta: torch.Tensor | None, gu_block_idx: torch.Tensor | None, gu_bw: int, w_down: torch.Tensor,
    d_meta: torch.Tensor | None, d_block_idx: torch.Tensor | None, d_bw: int, gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None, activation: str, deterministic: bool, tile_n: int, gateup_splits: int,
    down_splits: int, raster: int, programmatic_launch: bool,
) -> torch.Tensor:
    """Dense weights: meta and block_idx None; Block N:M weights: their values, meta, block_idx and bw; biases fp32
    or None. The launch overrides are LaunchConfig's fields, 0 for None."""
    return _fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, w_down, d_meta,
                           d_block_idx, d_bw, gate_up_bias, down_bias, activation, deterministic, tile_n,
                           gateup_splits, down_splits, raster, programmatic_launch)


@_fused_moe_op.register_fake
def _fused_moe_fake(x, *args):
    return x.new_empty(x.shape, dtype=torch.bfloat16)
