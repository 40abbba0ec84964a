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
* :func:`check_errors` -- raise the device-side id check's pending error (below), after a sync by default.

A call reads top to bottom: ``fused_moe`` checks its arguments (the same pass ``hare.moe`` runs, once), then
``_fused_moe_impl`` finds the call's *program*: everything fixed by its shapes, weights, flags and device, built
once (``_build_program``: ``plan.plan_moe``'s launches, the workspace regions, the TMA descriptors, every argument
struct packed, the launch configs per stream), cached by a key of those facts. The call then allocates its output
and one workspace, writes the pointers that change (x, ids, routing weights, output, biases; the workspace's, when
it moved) into a pooled argument buffer, and launches (``_launch``: cuLaunchKernelEx through ctypes, else
cuda-bindings, imported lazily so this package imports on a CPU-only machine). The routing weights are converted to
fp32 by the layout kernel (no torch op). Kernels are CUDA C++ in ``csrc``, compiled at first use for sm_90a and
cached (``_build``). Both ops are torch.library custom ops (``torch.ops.hare.*``), so they run under torch.compile
and inside CUDA graphs (call each once before capture: the first call loads the kernels).

The id check (``check_ids=True``, ``hare.moe``'s default), with no host sync and inside CUDA graphs too: the layout
count kernel, which reads every id anyway, tests each for a value outside [0, E) and for an expert an earlier slot
of its token already names, and sends the flat index of a bad one to a per-device ``first_bad`` word (atomicMin: the
first bad id wins). The CTA that finishes the layout resets that word and, when an id was bad, (1) writes the
token, slot, value, expert count and kind into the device's error record, 16 words of pinned host memory mapped
into the device's address space (``cuMemHostAlloc`` with ``CU_MEMHOSTALLOC_DEVICEMAP``; the CUDA driver API's
``cuMemHostGetDevicePointer`` gives the device's address of it, the host pointer itself under unified addressing), and
(2) writes NaN into the call's fp32 routing weights, so the down GEMM makes every output element NaN: a bad call's
output never looks valid. The host reads the record in place, without a sync or a copy, at the start of the next
eager call on that device (also of ``fused_moe``; not while capturing a graph, where it waits for the next eager
call) and at ``check_errors()``, and raises ``InvalidArgumentError`` naming the token, the slot, the value and the
valid range; a raised record is marked raised, so the next call runs. The record holds the first bad call not
yet raised, and counts the bad calls after it (the device writes its fields only while nothing is pending; the
host's "raised" count is a word of its own). A layout too large for the layout kernels (T·k·E past their shared
memory) is built with torch ops and checked on the host, as before. Layouts, and so checked calls, must not run
concurrently on two streams of one device (one ``first_bad`` word, one layout ticket per device).

Decode: for dense weights at ``plan.DECODE_MIN_ROWS``..``plan.DECODE_MAX_ROWS`` (token, slot) rows (where it measured
faster), or whenever ``LaunchConfig(fused_decode=True)`` asks and both projections' weights are read the same way
(both dense, both Block N:M, or both joint panels), the layout is followed by one persistent kernel
(``csrc/decode.cuh``) instead of two GEMMs and their combines: gate/up tiles, then down tiles that wait on counters
for their rows of h while their weights already stream in, the K-split and top-k sums done by the last tile to
arrive (notes/decode.md). Its counters are per device, like the layout ticket.

Determinism: ``fused_moe(..., deterministic=True)`` (the default) writes every (token, slot) row of the down
GEMM to a buffer and sums the top-k rows in slot order in a separate pass, so results are bitwise identical from
run to run and independent of scheduling. ``deterministic=False`` accumulates the rows with fp32 vector atomics
instead (order-dependent rounding). The default is deterministic because reproducible serving and tests matter
more than the small difference measured in notes/kernels.md. The fused decode kernel is always deterministic:
its sums are the unfused deterministic path's, in the same order, bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import NamedTuple

import torch

from ..blocknm import PANEL, BlockNM
from ..errors import InvalidArgumentError
from ..routing import DEFAULT_BLOCK, RoutingLayout, max_blocks, route
from .plan import (COMBINE_PARAMS, DECODE_PARAMS, DEFAULT_CONFIG, FUSED_ACTIVATIONS, GEMM_PARAMS, GEMV_PARAMS,
                   GEMV_THREADS, GLU_COMBINE_PARAMS, K_ALIGN, LAYOUT_PARAMS, LAYOUT_TILE_ITEMS, SMALL_THREADS,
                   GEMM_THREADS, LaunchConfig, LayoutPlan, WeightFormat, activation_code, choose_block_n, gated_unit,
                   layout_plan, plan_moe)

__all__ = ["availability", "unsupported", "build_layout", "fused_moe", "check_errors", "LaunchConfig", "choose_block_n",
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


def _layout_values(mod, topk_ids, ids_is_64: bool, R: int, k: int, E: int, block: int, slots: int, lay: LayoutPlan,
                   field, weights_in=0, weights_out=0, weights_code: int = 0, check_ids: bool = False) -> dict:
    """The LayoutParams fields by name; `field(name)` gives each layout field's address (or its _Ptr)."""
    return dict(topk_ids=topk_ids, ticket=mod.ticket.data_ptr(), weights_in=weights_in, weights_out=weights_out,
                first_bad=mod.first_bad.data_ptr(), status=mod.status_ptr, ids_is_64=int(ids_is_64), num_rows=R,
                top_k=k, num_experts=E, block=block, num_slots=slots, tile_items=LAYOUT_TILE_ITEMS,
                num_tiles=lay.num_tiles, weights_dtype=weights_code, check_ids=int(check_ids),
                **{f: field(f) for f in LayoutPlan.FIELDS})


def _launch_layout(mod, stream: int, pdl: bool, ids: torch.Tensor, E: int, block: int, R: int, slots: int,
                   lay: LayoutPlan, base_ptr: int) -> None:
    """The layout kernels, writing the fields of `lay` into the int32 buffer at base_ptr."""
    from . import _launch

    # no routing weights, no id check (build_layout clamps ids, unchecked)
    values = _layout_values(mod, ids.data_ptr(), ids.dtype == torch.int64, R, ids.shape[1], E, block, slots, lay,
                            lambda f: base_ptr + 4 * lay.offset(f))
    p = _launch.params(LAYOUT_PARAMS, *(values[name] for _, name, _ in LAYOUT_PARAMS.fields))
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
def _weight_parts(w) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, str]:
    """(values or dense weight, meta, block_idx, bw, joint or ""): what the custom op takes of a dense tensor or a
    BlockNM."""
    if isinstance(w, BlockNM):
        return w.values, w.meta, w.block_idx, w.bw, w.joint or ""
    return w, None, None, 0, ""


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up, w_down,
              activation: str = "silu", deterministic: bool = True, config: LaunchConfig | None = None,
              gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
              check_ids: bool = False) -> torch.Tensor:
    """out[t] = sum_j w[t,j] * (W_down[e] glu(W_gate[e] x_t + b_gate[e], W_up[e] x_t + b_up[e]) + b_down[e]),
    e = topk_ids[t,j], on the kernels.

    x (T, H) bf16; topk_ids (T, k) int; topk_weights (T, k) float; w_gate_up (E, 2F, H) (rows [0, F) gate,
    [F, 2F) up) and w_down (E, H, F), each a bf16 tensor or a stacked ``hare.BlockNM`` with bf16 values (the
    sparse kernels run on its compressed storage); optional float expert biases gate_up_bias (E, 2F) and
    down_bias (E, H) (added in fp32); ``activation`` one of ``FUSED_ACTIVATIONS``' units as ``hare.activations``
    names them ("gpt-oss:alpha=A,limit=L", ...); all on one sm_90 device; ``unsupported`` says what else the kernels
    need. ``check_ids=True`` checks the ids on the device (the module docstring; ``hare.moe`` passes its own
    ``check_ids``), else they are clamped into range unchecked. ``config`` overrides the launch plan. Returns (T, H)
    bf16. ``deterministic`` (default True): see the module docstring.
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
                         gate_up_bias, down_bias, bool(check_ids))


def _fp32(b: torch.Tensor | None) -> torch.Tensor | None:
    return b if b is None or (b.dtype == torch.float32 and b.is_contiguous()) else b.float().contiguous()


def run_fused_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str, deterministic: bool,
                  config: LaunchConfig | None = None, gate_up_bias=None, down_bias=None,
                  check_ids: bool = False) -> torch.Tensor:
    """fused_moe on arguments already checked (``hare.moe`` calls this after its own pass; weights contiguous)."""
    args = _op_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, deterministic, config, gate_up_bias,
                    down_bias, check_ids)
    if torch.compiler.is_compiling():
        return torch.ops.hare.fused_moe(*args)
    # eager (and CUDA-graph capture): skip the custom-op dispatcher, which costs ~80 us per call in eager mode
    return _fused_moe_impl(*args)


def _op_args(x, topk_ids, topk_weights, w_gate_up, w_down, activation, deterministic, config, gate_up_bias,
             down_bias, check_ids) -> tuple:
    """The arguments of the custom op (``_fused_moe_impl``): each weight as its parts, the overrides as ints."""
    c = config or DEFAULT_CONFIG
    return (x, topk_ids, topk_weights, *_weight_parts(w_gate_up), *_weight_parts(w_down), _fp32(gate_up_bias),
            _fp32(down_bias), activation, bool(deterministic), c.tile_n or 0, c.gateup_splits or 0,
            c.down_splits or 0, c.raster or 0, c.programmatic_launch, _FUSED_CODES[c.fused_decode],
            _FUSED_CODES[c.gemv], bool(check_ids))


_FUSED_CODES = {None: -1, False: 0, True: 1}  # LaunchConfig.fused_decode and .gemv as the custom op's ints
_plan = functools.lru_cache(maxsize=4096)(plan_moe)  # a plan is a pure function of its (hashable) arguments

# ---- the prepared call ("program") ----
# Sources of the pointers a call patches into its argument structs: the call's own tensors, then its workspace.
_OUT, _X, _IDS, _WEIGHTS, _GU_BIAS, _D_BIAS, _WS = range(7)
_WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}  # LayoutParams codes
_ALIGN = 256  # bytes: every region of the workspace starts on this


class _Ptr(NamedTuple):
    """An argument-struct pointer a call patches: its source (_OUT ... _WS) plus a byte offset."""

    source: int
    offset: int = 0


class _KernelLaunch(NamedTuple):
    """One launch of a program: kernel, grid, threads, shared memory, TMA descriptors, and where its argument
    structs lie in the program's argument buffer ((offset, size) in bytes each; the kernel takes them in order
    after the descriptors)."""

    kernel: str
    grid: int
    block: int
    smem: int
    maps: tuple
    structs: tuple


class _CallBuffer:
    """One argument buffer of a program: every struct of a call, filled from the program's template, with an 8-byte
    word view for patching. It remembers the workspace its workspace pointers were patched for (a steady loop gets
    the same one back from torch's allocator, so they are patched again only when it moves) and its void** arrays
    (``_launch``)."""

    __slots__ = ("data", "words", "ws", "kparams")

    def __init__(self, template: bytes):
        self.data = ctypes.create_string_buffer(template, len(template))
        self.words = (ctypes.c_uint64 * (len(template) // 8)).from_buffer(self.data)
        self.ws = None
        self.kparams = None


class _Program:
    """Everything of a fused MoE call fixed by its shapes, weights, flags and device: the plan, the workspace layout,
    the launches with their TMA descriptors, and their argument structs packed once (``template``). A call
    allocates its output and one workspace, patches the pointers that change (the call's tensors: x, the ids, the
    routing weights, the output, the biases; the workspace regions, when the workspace moved) into a pooled buffer,
    and launches."""

    def __init__(self, plan, launches, pdl, template, patches, ws_bytes, regions, host_layout):
        self.plan, self.launches, self.pdl, self.template = plan, tuple(launches), pdl, template
        self.ws_bytes, self.regions, self.host_layout = ws_bytes, regions, host_layout
        # (8-byte word of the buffer, source) of each patched pointer; workspace ones carry their byte offset
        self.call_words = tuple((o // 8, p.source) for o, p in patches if p.source != _WS)
        self.ws_words = tuple((o // 8, p.offset) for o, p in patches if p.source == _WS)
        self.handles = {}  # per stream: the launches' functions and launch configs (``_launch``)
        self.pool: list[_CallBuffer] = []

    def buffer(self) -> _CallBuffer:
        return self.pool.pop() if self.pool else _CallBuffer(self.template)

    def release(self, buf: _CallBuffer) -> None:
        if len(self.pool) < 4:
            self.pool.append(buf)


def _pack(s, values: dict, base: int, patches: list) -> bytes:
    """Struct `s` (a plan.py table) with `values` by field name; _Ptr values are packed as 0 and their byte
    offsets (from `base`, the struct's place in the buffer) appended to `patches`."""
    at, packed = base, []
    for ctype, name, _ in s.fields:
        v = values[name]
        if isinstance(v, _Ptr):
            patches.append((at, v))
            v = 0
        packed.append(v)
        at += 4 if ctype in ("int", "float") else 8
    return s.pack(*packed)


def _build_program(mod, T, k, E, H, F, gu_parts, dn_parts, activation, deterministic, config, ids_is_64,
                   weights_code, has_gu_bias, has_d_bias, check_ids) -> _Program:
    from . import _launch

    w_gate_up, gu_meta, gu_block_idx, gu_bw, gu_joint = gu_parts
    w_down, d_meta, d_block_idx, d_bw, d_joint = dn_parts
    F2, R = 2 * F, T * k
    gu = WeightFormat.of(H, gu_block_idx, gu_bw, gu_joint or None)
    dn = WeightFormat.of(F, d_block_idx, d_bw, d_joint or None)
    plan = _plan(T, k, E, H, F, gu, dn, activation, deterministic, mod.num_sms, config)
    n, slots, lay = plan.tile_n, plan.slots, plan.layout

    # the workspace: layout fields (int32), fp32 routing weights, bf16 h then Y, fp32 gate/up partials, fp32 acc
    regions, at = {}, 0
    for name, nbytes in (("layout", 4 * lay.total), ("weights", 4 * R), ("h", 2 * plan.workspace_elements),
                         ("partial", 4 * plan.partial_elements), ("acc", 4 * T * H if plan.accumulates else 0)):
        regions[name] = at
        at += -(-nbytes // _ALIGN) * _ALIGN
    ws = lambda region, offset=0: _Ptr(_WS, regions[region] + offset)  # noqa: E731
    field = lambda f: ws("layout", 4 * lay.offset(f))  # noqa: E731
    h, wts = ws("h"), ws("weights")

    launches, structs, patches = [], [], []

    def pack(s, values) -> tuple[int, int]:
        offset = sum(len(b) for b in structs)
        structs.append(_pack(s, values, offset, patches))
        return offset, s.size

    def add(kernel, grid, block, smem, maps, s, values, shared_with=None):
        where = pack(s, values) if shared_with is None else shared_with
        launches.append(_KernelLaunch(kernel, grid, block, smem, tuple(maps), (where,)))
        return where

    if plan.gemv is not None:  # the few-token path: two launches, no layout
        _gemv_launches(plan, pack, launches, activation, H, F, gu_parts, dn_parts, has_gu_bias, has_d_bias,
                       _layout_values(mod, _Ptr(_IDS), ids_is_64, R, k, E, n, slots, lay, lambda f: 0, _Ptr(_WEIGHTS),
                                      wts, weights_code, check_ids), h)
        return _Program(plan, launches, plan.programmatic_launch, b"".join(structs), patches, max(at, _ALIGN),
                        regions, False)
    if lay.on_device:
        layout_values = _layout_values(mod, _Ptr(_IDS), ids_is_64, R, k, E, n, slots, lay, field, _Ptr(_WEIGHTS), wts,
                                       weights_code, check_ids)
        at_layout = None
        for kl in (lay.count, lay.scatter):  # both kernels read the one struct
            if kl is not None:
                at_layout = add(kl.kernel, kl.grid, SMALL_THREADS, kl.smem, (), LAYOUT_PARAMS, layout_values,
                                at_layout)

    alpha, limit = plan.glu_args

    def gemm_values(launch, fmt, block_idx, bias, b_src, out, split_stride, K, M, rows_per_expert):
        tiling = launch.tiling
        values = dict(b_src=b_src, out=out, gather_index=field("gather_index"),
                      row_assignment=field("row_assignment"), topk_weights=wts, block_expert=field("block_expert"),
                      block_start=field("block_start"), block_height=field("block_height"),
                      num_blocks=field("num_blocks"), block_idx=0 if block_idx is None else block_idx.data_ptr(),
                      bias=bias, out_split_stride=split_stride, K=K, M=M, a_rows_per_expert=rows_per_expert,
                      a_box1_offset=tiling.box1_rows, m_tile=tiling.m_tile, num_m=tiling.num_m, splits=launch.splits,
                      k_blocks_per_split=launch.k_per_split, top_k=k, num_rows=R, group=launch.raster,
                      k_stages=fmt.k_stages, kept=fmt.kept, bw_log2=fmt.bw_log2, panels=fmt.panels,
                      box1_panel_offset=tiling.box1_panel_offset, all_kept=int(fmt.all_kept), num_experts=E,
                      num_slots=slots, act_alpha=alpha, act_limit=limit)
        return values

    def gemm(launch, fmt, maps, *args):
        add(launch.kernel, launch.grid, GEMM_THREADS, launch.smem, maps, GEMM_PARAMS, gemm_values(launch, fmt, *args))

    def maps(w, meta, out_rows, K):
        if meta is None:
            return (_launch.weight_tensor_map(w, E * out_rows, K),)
        return _launch.sparse_tensor_maps(w, meta)

    # gate/up: h (R, F) = act(x[g] W_gate^T) * (x[g] W_up^T), expert-sorted rows; split: fp32 partials, then combine
    g = plan.gate_up
    gu_bias = _Ptr(_GU_BIAS) if has_gu_bias else 0
    gu_args = (maps(w_gate_up, gu_meta, F2, H), gu_block_idx, gu_bias, _Ptr(_X))
    gu_shape = (H, F, F2)  # K, M, weight rows per expert; which rows a tile's boxes are: plan.gate_up.tiling
    d = plan.down
    d_args = (maps(w_down, d_meta, H, F), d_block_idx, _Ptr(_D_BIAS) if has_d_bias else 0, h)
    d_shape = (F, H, H)
    if plan.decode is not None:  # the fused decode kernel: gate/up, down and the sums in one launch
        dec = plan.decode
        counters = mod.decode_counters(dec.counters)
        y = ws("h", 2 * R * F)
        gu_out = ws("partial") if g.splits > 1 else h
        gu_values = gemm_values(g, gu, *gu_args[1:], gu_out, R * F2, *gu_shape)
        d_values = gemm_values(d, dn, *d_args[1:], y, R * H, *d_shape)
        block_ready = counters + 4
        dp = dict(h=h, out=_Ptr(_OUT), block_ready=block_ready, tile_count=block_ready + 4 * dec.block_ready,
                  token_count=block_ready + 4 * (dec.block_ready + dec.tile_count), exit_ticket=counters,
                  activation=dec.activation, trace=0 if decode_trace is None else decode_trace(dec.tiles))
        args = (pack(GEMM_PARAMS, gu_values), pack(GEMM_PARAMS, d_values), pack(DECODE_PARAMS, dp))
        launches.append(_KernelLaunch(dec.kernel, dec.grid, GEMM_THREADS, dec.smem, (*gu_args[0], *d_args[0]), args))
        return _Program(plan, launches, plan.programmatic_launch, b"".join(structs), patches, max(at, _ALIGN),
                        regions, not lay.on_device)
    if plan.glu_combine is None:
        gemm(g, gu, *gu_args, h, 0, *gu_shape)
    else:
        gemm(g, gu, *gu_args, ws("partial"), R * F2, *gu_shape)
        c = plan.glu_combine
        add(c.kernel, c.grid, SMALL_THREADS, c.smem, (), GLU_COMBINE_PARAMS,
            dict(part=ws("partial"), h=h, split_stride=R * F2, num_rows=R, ffn=F, splits=g.splits, alpha=alpha,
                 limit=limit))

    # down: y = (h W_down^T) * routing weight, back in token order
    if deterministic:
        y = _Ptr(_OUT) if plan.direct else ws("h", 2 * R * F)  # Y follows h in the workspace
        gemm(d, dn, *d_args, y, R * H, *d_shape)
        if plan.combine is not None:
            c = plan.combine
            add(c.kernel, c.grid, SMALL_THREADS, c.smem, (), COMBINE_PARAMS,
                dict(y=y, out=_Ptr(_OUT), split_stride=R * H, num_tokens=T, hidden=H, top_k=k, splits=d.splits))
    else:
        gemm(d, dn, *d_args, ws("acc"), 0, *d_shape)
    return _Program(plan, launches, plan.programmatic_launch, b"".join(structs), patches, max(at, _ALIGN), regions,
                    not lay.on_device)


def _gemv_launches(plan, pack, launches, activation, H, F, gu_parts, dn_parts, has_gu_bias, has_d_bias,
                   layout_values, h) -> None:
    """The few-token path's two launches (csrc/gemv.cuh), each taking its GemvParams and the one LayoutParams (ids,
    routing weights, the id check)."""
    at_layout = pack(LAYOUT_PARAMS, layout_values)
    alpha, limit = plan.glu_args
    code = activation_code(gated_unit(activation)[0])
    for launch, (w, meta, block_idx, bw, _), src, dst, bias, K, M, rows, half_rows in (
            (plan.gemv[0], gu_parts, _Ptr(_X), h, _Ptr(_GU_BIAS) if has_gu_bias else 0, H, F, 2 * F, F),
            (plan.gemv[1], dn_parts, h, _Ptr(_OUT), _Ptr(_D_BIAS) if has_d_bias else 0, F, H, H, H)):
        sparse = meta is not None
        values = dict(src=src, dst=dst, w=w.data_ptr(), meta=meta.data_ptr() if sparse else 0,
                      block_idx=block_idx.data_ptr() if sparse else 0, bias=bias, K=K, M=M, rows=rows,
                      width=w.shape[2], meta_stride=meta.shape[2] if sparse else 0,
                      kept=block_idx.shape[2] if sparse else 0, bw_log2=bw.bit_length() - 1 if sparse else 0,
                      panels=block_idx.shape[1] if sparse else 0, half_rows=half_rows,
                      half_panel=block_idx.shape[1] // 2 if sparse else 0, lanes_log2=launch.lanes_log2,
                      segments=launch.segments,
                      units_per_cta=launch.units_per_cta, ctas_per_row=launch.ctas_per_row, activation=code,
                      act_alpha=alpha, act_limit=limit)
        launches.append(_KernelLaunch(launch.kernel, launch.grid, GEMV_THREADS, launch.smem, (),
                                      (pack(GEMV_PARAMS, values), at_layout)))


# scripts/profile_layer.py --timeline: a function giving the address of a (tiles, 4) int64 buffer for the fused
# decode kernel's marks (csrc/decode.cuh), set while it builds its programs; None for every other call
decode_trace = None
_programs: dict[tuple, _Program] = {}
_PROGRAMS_MAX = 8192


def _fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, gu_joint, w_down, d_meta,
                    d_block_idx, d_bw, d_joint, gate_up_bias, down_bias, activation: str, deterministic: bool,
                    tile_n: int,
                    gateup_splits: int, down_splits: int, raster: int, programmatic_launch: bool, fused_decode: int,
                    gemv: int = -1, check_ids: bool = False):
    """Program -> allocate -> patch -> launch. Each projection dense (meta None) or Block N:M (values, meta,
    block_idx, bw, joint: "" or its panel pairing); biases fp32 contiguous or None."""
    from . import _launch

    T, H = x.shape
    dev = x.device
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    if T == 0:
        return out
    mod = _launch.module(dev)
    status = mod.status
    if status[0] != status[1] and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        _raise_bad_ids(mod, dev)  # an earlier call's bad ids (the record is read at the next eager call)
    E, F2, _ = w_gate_up.shape
    k = topk_ids.shape[1]
    if topk_ids.dtype not in (torch.int32, torch.int64):
        topk_ids = topk_ids.to(torch.int32)
    if not topk_ids.is_contiguous():
        topk_ids = topk_ids.contiguous()
    if not topk_weights.is_contiguous():
        topk_weights = topk_weights.contiguous()
    if not x.is_contiguous():
        x = x.contiguous()
    ids_is_64 = topk_ids.dtype == torch.int64
    weights_code = _WEIGHT_DTYPES[topk_weights.dtype]
    key = (dev.index, T, k, E, H, F2, w_gate_up.data_ptr(), w_down.data_ptr(),
           None if gu_meta is None else (gu_meta.data_ptr(), gu_block_idx.data_ptr(), gu_block_idx.shape, gu_bw,
                                         gu_joint),
           None if d_meta is None else (d_meta.data_ptr(), d_block_idx.data_ptr(), d_block_idx.shape, d_bw, d_joint),
           activation, deterministic, tile_n, gateup_splits, down_splits, raster, programmatic_launch, fused_decode,
           gemv, ids_is_64,
           weights_code, gate_up_bias is None, down_bias is None, check_ids)
    prog = _programs.get(key)
    if prog is None:
        config = LaunchConfig(tile_n or None, gateup_splits or None, down_splits or None, raster or None,
                              programmatic_launch, None if fused_decode < 0 else bool(fused_decode),
                              None if gemv < 0 else bool(gemv))
        prog = _build_program(mod, T, k, E, H, F2 // 2, (w_gate_up, gu_meta, gu_block_idx, gu_bw, gu_joint),
                              (w_down, d_meta, d_block_idx, d_bw, d_joint), activation, deterministic, config,
                              ids_is_64,
                              weights_code, gate_up_bias is not None, down_bias is not None, check_ids)
        if len(_programs) >= _PROGRAMS_MAX:
            _programs.clear()
        _programs[key] = prog
    ws = torch.empty(prog.ws_bytes, dtype=torch.uint8, device=dev)
    ws_ptr = ws.data_ptr()
    if prog.host_layout:  # very large T*k*E: the torch-ops layout (whose id check syncs with the host when eager)
        _host_layout(prog, ws, topk_ids, topk_weights, E)
    if prog.plan.accumulates:
        ws[prog.regions["acc"]:prog.regions["acc"] + 4 * T * H].view(torch.float32).zero_()
    buf = prog.buffer()
    try:
        words = buf.words
        if buf.ws != ws_ptr:
            for i, offset in prog.ws_words:
                words[i] = ws_ptr + offset
            buf.ws = ws_ptr
        sources = (out.data_ptr(), x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr(),
                   0 if gate_up_bias is None else gate_up_bias.data_ptr(),
                   0 if down_bias is None else down_bias.data_ptr())
        for i, source in prog.call_words:
            words[i] = sources[source]
        mod.run(prog, _launch.current_stream(dev), buf)
    finally:
        prog.release(buf)
    if prog.plan.accumulates:
        out.copy_(ws[prog.regions["acc"]:prog.regions["acc"] + 4 * T * H].view(torch.float32).view(T, H))
    return out


def _host_layout(prog: _Program, ws: torch.Tensor, topk_ids, topk_weights, E: int) -> None:
    """The layout of hare.routing.route and the fp32 routing weights written into the workspace with torch ops (the
    layouts too large for the layout kernels' shared memory)."""
    lay, R = prog.plan.layout, prog.plan.rows
    ints = ws[prog.regions["layout"]:prog.regions["layout"] + 4 * lay.total].view(torch.int32)
    ref = route(topk_ids, E, prog.plan.tile_n)
    for name, start in zip(LayoutPlan.FIELDS[:9], lay.offsets):
        value = getattr(ref, name).reshape(-1)
        ints[start:start + value.numel()].copy_(value)
    w = prog.regions["weights"]
    ws[w:w + 4 * R].view(torch.float32).copy_(topk_weights.reshape(-1))


def _raise_bad_ids(mod, device) -> None:
    """Raise (and mark raised) the pending record of the id check on `device`."""
    from . import _launch as L

    st = mod.status
    errors, reported = st[L.STATUS_ERRORS], st[L.STATUS_REPORTED]
    rec = [st[i] for i in range(L.STATUS_WORDS)]
    st[L.STATUS_REPORTED] = errors
    raise InvalidArgumentError(bad_ids_message(rec, errors - reported, reported, device))


def bad_ids_message(rec, bad_calls: int, reported: int, device) -> str:
    """The message of the id check's record `rec` (status words; ``bad_calls`` calls with bad ids not yet raised)."""
    from . import _launch as L

    where = f"an earlier hare.moe call on {device}"
    more = f"; {bad_calls - 1} later call(s) had bad ids too" if bad_calls > 1 else ""
    if rec[L.STATUS_SEQ] != reported or rec[L.STATUS_CODE] not in (L.ID_OUT_OF_RANGE, L.ID_REPEATED):
        return (f"topk_ids: {bad_calls} earlier hare.moe call(s) on {device} had bad expert ids (out of range, or "
                "one expert twice in a token); their outputs are NaN")
    token, slot, value, E = rec[L.STATUS_TOKEN], rec[L.STATUS_SLOT], rec[L.STATUS_VALUE], rec[L.STATUS_EXPERTS]
    shape = f"{rec[L.STATUS_TOKENS]} tokens, top-{rec[L.STATUS_TOP_K]}"
    if rec[L.STATUS_CODE] == L.ID_OUT_OF_RANGE:
        what = f"token {token}, slot {slot}: expert id {value} is not in [0, {E})"
    else:
        what = f"token {token} is routed to expert {value} twice (slots {rec[L.STATUS_OTHER_SLOT]} and {slot})"
    return f"topk_ids: {what}, in {where} ({shape}); its output is NaN{more}"


def check_errors(device=None, synchronize: bool = True) -> None:
    """Raise ``InvalidArgumentError`` for bad ``topk_ids`` that an earlier ``hare.moe`` call on ``device`` (default:
    the current CUDA device) found with ``check_ids=True`` on the kernels and that no call has raised yet.
    ``synchronize`` (default True) waits for the device first, so every call made before is covered; without it
    only the calls already finished are. Nothing to do where no kernel ran."""
    launch = sys.modules.get(__name__ + "._launch")  # never imported: no kernel ran in this process
    if launch is None:
        return
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    mod = launch.loaded(device)
    if mod is None:
        return
    if synchronize:
        torch.cuda.synchronize(device)
    status = mod.status
    if status[0] != status[1]:
        _raise_bad_ids(mod, device)


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
    gu_meta: torch.Tensor | None, gu_block_idx: torch.Tensor | None, gu_bw: int, gu_joint: str, w_down: torch.Tensor,
    d_meta: torch.Tensor | None, d_block_idx: torch.Tensor | None, d_bw: int, d_joint: str,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None, activation: str, deterministic: bool, tile_n: int, gateup_splits: int,
    down_splits: int, raster: int, programmatic_launch: bool, fused_decode: int, gemv: int, check_ids: bool,
) -> torch.Tensor:
    """Dense weights: meta and block_idx None; Block N:M weights: their values, meta, block_idx, bw and joint ("" for
    none); biases fp32 or None. The launch overrides are LaunchConfig's fields, 0 for None (fused_decode, gemv: -1);
    check_ids: the device-side id check."""
    return _fused_moe_impl(x, topk_ids, topk_weights, w_gate_up, gu_meta, gu_block_idx, gu_bw, gu_joint, w_down,
                           d_meta, d_block_idx, d_bw, d_joint, gate_up_bias, down_bias, activation, deterministic,
                           tile_n, gateup_splits, down_splits, raster, programmatic_launch, fused_decode, gemv,
                           check_ids)


@_fused_moe_op.register_fake
def _fused_moe_fake(x, *args):
    return x.new_empty(x.shape, dtype=torch.bfloat16)
