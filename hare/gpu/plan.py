"""The launch plan of one fused MoE call: every choice ``hare.gpu`` makes before a kernel runs, as a frozen value.

Python decides, the kernels receive. ``plan_moe`` computes from shapes and device facts alone (never the routing,
never a host sync, so a plan holds for every call of a CUDA graph) the token tile, the K splits, the tile order,
the shared memory, the kernel names and the workspace layout; ``hare.gpu.fused_moe`` allocates what the plan says
and launches it. ``LaunchConfig`` overrides choices, for benchmarks and tests. Pure Python: tested on the CPU.

Kernel variants: ``GEMM_VARIANTS`` (projection x its epilogues) x ``WEIGHT_KINDS`` x ``TILE_NS`` GEMMs plus the
small kernels make the one table that ``_build`` instantiates (``kernel_names``, ``generated_sources``);
``gemm_kernel`` is the one function naming a GEMM. A new gated unit is one entry of ``GATE_UP_UNITS`` (and its
``glu<>`` case in csrc/epilogue.cuh).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..activations import glu_parameters
from ..errors import InvalidArgumentError
from ..routing import max_blocks

TILE_NS = (16, 32, 64, 128)  # token rows per GEMM tile (the wgmma N); one kernel variant each
# The gated units the gate/up epilogue fuses: hare.activations family name -> (kernel-name part, Activation
# enumerator of csrc/epilogue.cuh). Their parameters (alpha, limit) are launch arguments, not variants.
GATE_UP_UNITS = {"silu": ("silu", "kSilu"), "gelu": ("gelu", "kGelu"),
                 "clamped-silu": ("clamped_silu", "kClampedSilu"), "gpt-oss": ("gpt_oss", "kGptOss")}
FUSED_ACTIVATIONS = tuple(GATE_UP_UNITS)
# The GEMM variant table: projection -> (Projection enumerator of csrc/moe_gemm.cuh, {epilogue: its enumerator}).
# gate/up epilogues are the fused gated units; down epilogues the top-k reductions (det: rows summed in slot order
# by hare_combine, or written directly; fast: fp32 atomics).
GEMM_VARIANTS = {"gateup": ("kGateUp", dict(GATE_UP_UNITS.values())),
                 "down": ("kDown", {"det": "kDet", "fast": "kFast"})}
# How a GEMM reads its weights: kind -> (kernel-name suffix, the SPARSE and SHARED_B template arguments).
# "sparse": Block N:M whose two weight boxes per tile are panels with different kept blocks, one gathered token
# tile each; "joint": Block N:M whose two boxes keep the same blocks (1:1, or joint panels paired as the tile
# pairs them), so one token tile serves both and a stage is smaller (more stages fit).
WEIGHT_KINDS = {"dense": ("", "false", "false"), "sparse": ("_sp", "true", "false"),
                "joint": ("_spj", "true", "true")}
# The fused decode kernel (csrc/decode.cuh): one per weight kind read the same by both projections and tile width;
# its gated unit is an argument.
DECODE_TILE_NS = (16, 32, 64)
# The plan runs it for dense weights at DECODE_MIN_ROWS <= T·k <= DECODE_MAX_ROWS, where the H200 measured it
# faster than the unfused kernels; elsewhere it was as fast or slower (notes/decode.md), so it runs only when
# LaunchConfig.fused_decode asks (any weight kind, any T·k).
DECODE_MIN_ROWS, DECODE_MAX_ROWS = 32, 128
# The few-token path (csrc/gemv.cuh): two launches, no layout, dot products on the CUDA cores; one kernel per
# projection and weight storage (dense, Block N:M), the gated unit an argument. The plan takes it where the H200
# measured it faster than the layout + GEMM path (notes/decode.md, bench/results/decode/gemv_h200.json): up to
# GEMV_MAX_ROWS (token, slot) rows, and up to GEMV_SPARSE_ROWS where both projections keep at most GEMV_SPARSE_KEPT
# of their K columns (5% density: 4 tokens of Qwen3-30B-A3B, DeepSeek-V2-Lite, Qwen1.5-MoE ran 1.09-1.21x faster,
# 10% lost or tied), on experts of up to GEMV_MAX_EXPERT weights (3·H·F; Mixtral-8x7B's 176M ran slower, its GEMMs
# split K over few large experts), not on 1:1 Block N:M (50%: the sparse tensor cores' two values per four cost
# the CUDA cores a byte permute each); elsewhere when LaunchConfig.gemv asks.
GEMV_KERNELS = tuple(f"hare_gemv_{proj}{sfx}" for proj in ("gateup", "down") for sfx in ("", "_sp"))
GEMV_THREADS = 256
GEMV_CHUNKS_PER_LANE = 8  # 16-byte chunks of a weight row per lane (kGemvBatch, generated), before more lanes share it
GEMV_WAVES, GEMV_MAX_ITEMS = 16, 8  # above GEMV_WAVES CTAs per SM, a group takes up to GEMV_MAX_ITEMS items
GEMV_MAX_TOP_K = 64  # the down kernel's slots in shared memory (kGemvMaxTopK, generated)
# The down kernel's grid is at most GEMV_DOWN_CTAS_PER_SM resident CTAs an SM (its launch bounds) where its weight
# rows are at least GEMV_DOWN_CAP_CHUNKS 16-byte chunks, the rest of its units taken by more items per group: one
# wave then pays the chain after the grid dependency wait once (dense down at one token 1.07-1.09x faster; on
# shorter Block N:M rows it measured 2-5% slower: bench/results/decode/gemv_down_grid_ab_h200/).
GEMV_DOWN_CTAS_PER_SM, GEMV_DOWN_CAP_CHUNKS = 3, 32
GEMV_MAX_ROWS, GEMV_MAX_EXPERT = 8, 32 << 20
GEMV_SPARSE_ROWS, GEMV_SPARSE_KEPT = 32, 1 / 8
SMALL_KERNELS = ("hare_layout_count", "hare_layout_scatter", "hare_combine",
                 *(f"hare_glu_combine_{name}" for name, _ in GATE_UP_UNITS.values()))
K_ALIGN = 64  # hidden and ffn must be multiples of this: the K step of a pipeline stage
GEMM_THREADS = 384  # two consumer warpgroups and one producer (moe_gemm.cuh)
SMALL_THREADS = 256
SMEM_LIMIT = 232448  # opt-in shared memory per block on sm_90
LAYOUT_TILE_ITEMS = 2048  # (token, slot) assignments per layout CTA (kLayoutTileItems in layout.cuh)
LAYOUT_SMEM_CAP = 200 * 1024
SPLIT_MAX_ROWS = 4096  # K is split only up to this many rows (decode); above, a wave of tiles fills the GPU
DEFAULT_RASTER = 8  # M tiles per rasterization group (scheduler.cuh)


def gemm_kernel(projection: str, epilogue: str, weights: str, tile_n: int) -> str:
    """The entry point of a GEMM variant: hare_<projection>_<epilogue>[_sp|_spj]_bn<tile_n>."""
    return f"hare_{projection}_{epilogue}{WEIGHT_KINDS[weights][0]}_bn{tile_n}"


def decode_kernel(weights: str, tile_n: int) -> str:
    """The entry point of a fused decode kernel: hare_decode[_sp|_spj]_bn<tile_n>."""
    return f"hare_decode{WEIGHT_KINDS[weights][0]}_bn{tile_n}"


def activation_code(unit: str) -> int:
    """The Activation enumerator (generated into hare_params.cuh) of a gated unit's kernel-name part."""
    return [name for name, _ in GATE_UP_UNITS.values()].index(unit)


def gemm_variants():
    """(projection, epilogue, weight kind, tile_n) of every GEMM entry point."""
    return [(proj, epi, kind, n) for proj, (_, epis) in GEMM_VARIANTS.items() for epi in epis
            for kind in WEIGHT_KINDS for n in TILE_NS]


def kernel_names() -> tuple[str, ...]:
    """Every kernel entry point of the cubin."""
    return (*SMALL_KERNELS, *GEMV_KERNELS, *(gemm_kernel(*v) for v in gemm_variants()),
            *(decode_kernel(kind, n) for kind in WEIGHT_KINDS for n in DECODE_TILE_NS))


def gated_unit(activation: str) -> tuple[str, float, float]:
    """(kernel-name part, alpha, limit) of a fused gated unit named as hare.activations names it (parameters the
    unit does not take are 0). InvalidArgumentError for a unit the kernels do not fuse."""
    try:
        family, params = glu_parameters(activation)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    if family not in GATE_UP_UNITS:
        raise InvalidArgumentError(f"the Hopper kernels fuse the {'/'.join(FUSED_ACTIVATIONS)} gated units, not "
                                   f"{activation!r}")
    return GATE_UP_UNITS[family][0], float(params.get("alpha", 0.0)), float(params.get("limit", 0.0))


def gemm_smem_bytes(tile_n: int, weights: str) -> int:
    """Dynamic shared memory of a GEMM variant: as many pipeline stages as fit (at most 8 sparse / 6 dense), the
    epilogue staging, the per-row routing data and the barriers. GemmConfig<BN, SPARSE, SHARED_B>::kSmemBytes in
    moe_gemm.cuh computes the same (tests/test_kernels_compile.py compiles and compares both)."""
    if weights != "dense":  # compressed A boxes, a token tile per box (one when joint), two metadata boxes
        stage, max_stages = 256 * 32 * 2 + (1 if weights == "joint" else 2) * tile_n * 64 * 2 + 2 * 1024, 8
    else:
        stage, max_stages = 256 * 64 * 2 + tile_n * 64 * 2, 6
    epi, aux, bars = 2 * tile_n * 128, 2 * tile_n * 8, 256
    stages = min(max_stages, (SMEM_LIMIT - epi - aux - bars) // stage)
    return stages * stage + epi + aux + bars


TILE_HEADROOM = 1.25  # a tile holds this many times the mean rows per touched expert
SPARSE_TILE_N, SPARSE_WIDE_ROWS = 64, 256  # sparse weights: 64-row tiles up to 256 mean rows per expert


def choose_block_n(num_rows: int, num_experts: int, sparse: bool = False) -> int:
    """Token rows per tile for a launch, from (tokens·k, experts, whether the weights are Block N:M) alone (never
    the routing): the smallest tile >= TILE_HEADROOM x the mean rows per touched expert, so a uniformly routed
    expert rarely spills into a second, nearly empty block (each block re-reads the expert's weights); 128 for
    prefill. Sparse weights keep 64-row tiles up to SPARSE_WIDE_ROWS mean rows: more of their pipeline stages
    fit at 64 rows than at 128 (joint panels 8 against 5, others 6 against 3). Both rules are
    from the H200 sweep of scripts/tune_plan.py (notes/pipeline.md)."""
    mean = num_rows / max(1, min(num_experts, num_rows))
    n = next((n for n in TILE_NS if n >= TILE_HEADROOM * mean), TILE_NS[-1])
    return min(n, SPARSE_TILE_N) if sparse and mean <= SPARSE_WIDE_ROWS else n


def normalize_splits(splits: int, k_stages: int) -> int:
    """The number of non-empty splits when k_stages are cut into chunks of ceil(k_stages / splits)."""
    per = -(-k_stages // max(1, splits))
    return -(-k_stages // per)


def best_splits(tiles: int, k_stages: int, num_sms: int, max_splits: int = 16) -> int:
    """K splits for `tiles` output tiles of k_stages stages. Only below one wave of tiles (decode): there the GPU
    would be part idle, so K is split to minimise waves/splits on the persistent grid (plus a small per-split cost);
    each split keeps >= 4 stages. From one wave up, splitting only adds partial-sum traffic."""
    if tiles >= num_sms:
        return 1
    best, best_cost = 1, float("inf")
    for s in range(1, max(1, min(max_splits, k_stages // 4)) + 1):
        cost = -(-tiles * s // num_sms) / s + 0.02 * s
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return normalize_splits(best, k_stages)


@dataclass(frozen=True)
class LaunchConfig:
    """Overrides of the plan's choices (None: let the plan choose). For benchmarks and tests; the defaults are
    what serving uses."""

    tile_n: int | None = None  # token rows per tile, one of TILE_NS
    gateup_splits: int | None = None  # K splits of the gate/up GEMM (> 1: fp32 partials + hare_glu_combine)
    down_splits: int | None = None  # K splits of the down GEMM
    raster: int | None = None  # tile order of both GEMMs: > 0 M-grouped, < 0 block-grouped (scheduler.cuh)
    programmatic_launch: bool = True  # programmatic dependent launch (common.cuh); False launches plainly
    fused_decode: bool | None = None  # the one-launch decode kernel (csrc/decode.cuh); None: where it measured faster
    gemv: bool | None = None  # the few-token path (csrc/gemv.cuh); None: where it measured faster, without overrides

    @property
    def gemm_overrides(self) -> bool:
        """Whether any GEMM-path choice is overridden (then the plan never picks the few-token path itself)."""
        return any(v is not None for v in (self.tile_n, self.gateup_splits, self.down_splits, self.raster)) or \
            bool(self.fused_decode)

    def __post_init__(self):
        if self.tile_n is not None and self.tile_n not in TILE_NS:
            raise InvalidArgumentError(f"LaunchConfig.tile_n: expected one of {TILE_NS}, got {self.tile_n!r}")
        for name in ("gateup_splits", "down_splits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidArgumentError(f"LaunchConfig.{name}: expected an int >= 1, got {v!r}")
        if self.raster is not None and (isinstance(self.raster, bool) or not isinstance(self.raster, int)
                                        or self.raster == 0):
            raise InvalidArgumentError(f"LaunchConfig.raster: expected a nonzero int, got {self.raster!r}")
        if self.fused_decode is not None and not isinstance(self.fused_decode, bool):
            raise InvalidArgumentError(f"LaunchConfig.fused_decode: expected a bool or None, got "
                                       f"{self.fused_decode!r}")
        if self.fused_decode and self.tile_n is not None and self.tile_n not in DECODE_TILE_NS:
            raise InvalidArgumentError(f"LaunchConfig: the fused decode kernel takes tile_n in {DECODE_TILE_NS}, "
                                       f"got {self.tile_n}")
        if self.gemv is not None and not isinstance(self.gemv, bool):
            raise InvalidArgumentError(f"LaunchConfig.gemv: expected a bool or None, got {self.gemv!r}")
        if self.gemv and self.gemm_overrides:
            raise InvalidArgumentError("LaunchConfig: gemv=True runs no GEMM, so it takes no tile_n, splits, raster "
                                       "or fused_decode override")
        if not isinstance(self.programmatic_launch, bool):
            raise InvalidArgumentError(f"LaunchConfig.programmatic_launch: expected a bool, got "
                                       f"{self.programmatic_launch!r}")


DEFAULT_CONFIG = LaunchConfig()


@dataclass(frozen=True)
class WeightFormat:
    """What a GEMM launch needs to know of one projection's weights (shapes only): dense, or Block N:M with its
    kept K blocks per 128-row panel."""

    sparse: bool
    k_stages: int  # 64-logical-column pipeline stages over K
    kept: int = 0
    bw_log2: int = 0
    panels: int = 0
    all_kept: bool = False  # every K block kept (1:1): the kept columns are K itself, read contiguously
    joint: str | None = None  # which panels keep the same blocks (hare.blocknm.JOINT)

    @staticmethod
    def of(K: int, block_idx=None, bw: int = 0, joint: str | None = None) -> "WeightFormat":
        """The format of a projection over K input columns: dense (no block_idx) or Block N:M with its block_idx
        (E, panels, kept), block width and panel pairing (only shapes are read)."""
        if block_idx is None:
            return WeightFormat(False, K // 64)
        panels, kept = block_idx.shape[1], block_idx.shape[2]
        return WeightFormat(True, -(-kept * bw // 64), kept, bw.bit_length() - 1, panels, kept * bw == K, joint)

    def pairing(self, projection: str) -> str:
        """Which panels a tile's two 128-row weight boxes are (as hare.blocknm.JOINT names pairings): gate/up pairs
        gate panel m with up panel m ("halves"); down pairs panels 2m and 2m + 1 ("adjacent"), or m and m + P/2
        when the weight chose its kept blocks that way, so that its paired panels share a tile."""
        return "halves" if projection == "gateup" or self.joint == "halves" else "adjacent"

    def kind(self, projection: str) -> str:
        """The WEIGHT_KINDS entry the projection's GEMM runs."""
        if not self.sparse:
            return "dense"
        return "joint" if self.all_kept or self.joint == self.pairing(projection) else "sparse"


@dataclass(frozen=True)
class GemmLaunch:
    kernel: str
    grid: int
    smem: int
    splits: int
    k_per_split: int  # pipeline stages per split
    raster: int
    tiling: "Tiling"


@dataclass(frozen=True)
class Tiling:
    """Which weight rows the M tiles of a GEMM cover (per expert): tile m's box 0 is rows [m·m_tile, +128), box 1 the
    128 rows from there + box1_rows, which are panel box1_panel_offset further on; num_m tiles."""

    m_tile: int
    box1_rows: int
    box1_panel_offset: int
    num_m: int

    @staticmethod
    def of(pairing: str, out_rows: int, panels: int) -> "Tiling":
        if pairing == "halves":  # gate/up (out 2F: gate row f with up row F + f), or a down weight of out % 256 == 0
            half = out_rows // 2
            return Tiling(128, half, panels // 2, -(-half // 128))
        return Tiling(256, 128, 1, -(-out_rows // 256))


@dataclass(frozen=True)
class SmallLaunch:
    kernel: str
    grid: int
    smem: int = 0


@dataclass(frozen=True)
class DecodeLaunch:
    """The fused decode kernel's launch: its grid, and its counters (int32, zero at rest; csrc/decode.cuh) laid
    out as [exit ticket, block_ready (slots), tile_count (slots x gate/up M tiles), token_count (T x down M
    tiles)]."""

    kernel: str
    grid: int
    smem: int
    activation: int  # Activation enumerator of the gated unit
    block_ready: int
    tile_count: int
    token_count: int
    tiles: int  # gate/up then down tiles over every row-block slot (the most a call runs)

    @property
    def counters(self) -> int:
        return 1 + self.block_ready + self.tile_count + self.token_count


@dataclass(frozen=True)
class GemvLaunch:
    """One launch of the few-token path: CTA c takes units [(c % ctas_per_row)·units_per_cta, +units_per_cta) of
    row c / ctas_per_row (gate/up: ffn columns of a (token, slot) pair; down: hidden columns of a token); each of a
    unit's weight rows is cut into `segments` runs of chunks, one per group of 2^lanes_log2 lanes."""

    kernel: str
    grid: int
    smem: int
    lanes_log2: int
    segments: int
    units_per_cta: int
    ctas_per_row: int


def gemv_launch(kernel: str, rows: int, units: int, rows_per_unit: int, chunks_per_row: int, staged: int,
                num_sms: int, max_ctas: int | None = None) -> GemvLaunch:
    """`rows` x `units` units of `rows_per_unit` weight rows of `chunks_per_row` 16-byte chunks, each CTA first
    staging `staged` bytes of activations (Block N:M): lanes per group and segments per row so that a lane reads
    about GEMV_CHUNKS_PER_LANE chunks (one batch of loads), units per CTA so that each group takes one item, more
    (items per group) where the grid would be many waves, past max_ctas, or a CTA would stage more than it reads
    of weights."""
    lanes = 1
    while lanes < 32 and lanes * GEMV_CHUNKS_PER_LANE < chunks_per_row:
        lanes *= 2
    segments = -(-chunks_per_row // (lanes * GEMV_CHUNKS_PER_LANE))
    groups = GEMV_THREADS // lanes
    per_cta = max(1, groups // (rows_per_unit * segments))
    per_cta *= max(1, min(GEMV_MAX_ITEMS, rows * -(-units // per_cta) // (GEMV_WAVES * num_sms)))
    per_cta = min(units, max(per_cta, -(-staged // (16 * rows_per_unit * chunks_per_row))))
    if max_ctas is not None and rows * -(-units // per_cta) > max_ctas:
        per_cta = min(units, max(per_cta, -(-units // max(1, max_ctas // rows))))
    ctas = -(-units // per_cta)
    return GemvLaunch(kernel, rows * ctas, staged + 4 * per_cta * rows_per_unit * segments, lanes.bit_length() - 1,
                      segments, per_cta, ctas)


def gemv_chunks(fmt: "WeightFormat", K: int) -> int:
    """16-byte chunks of one weight row: K values dense; kept·bw / 2 values Block N:M."""
    return (fmt.kept << fmt.bw_log2) // 16 if fmt.sparse else K // 8


@dataclass(frozen=True)
class LayoutPlan:
    """The layout kernels' launch and the int32 buffer they fill (offsets of its fields, in FIELDS order)."""

    FIELDS = ("counts", "offsets", "gather_index", "row_assignment", "assignment_row", "block_expert", "block_start",
              "block_height", "num_blocks", "tile_base")
    num_tiles: int
    offsets: tuple[int, ...]
    total: int
    on_device: bool  # False: too large for the layout kernels, built with torch ops instead
    count: SmallLaunch
    scatter: SmallLaunch | None

    def offset(self, field: str) -> int:
        return self.offsets[self.FIELDS.index(field)]


@dataclass(frozen=True)
class MoePlan:
    """Everything one fused MoE call launches, and the workspace it needs (element counts)."""

    tokens: int
    top_k: int
    experts: int
    hidden: int
    ffn: int
    tile_n: int
    slots: int  # row-block slots of the layout (max_blocks)
    layout: LayoutPlan
    gate_up: GemmLaunch
    glu_args: tuple[float, float]  # (alpha, limit) of the gated unit (0 where it takes none)
    glu_combine: SmallLaunch | None  # after a split gate/up GEMM
    down: GemmLaunch
    combine: SmallLaunch | None  # deterministic top-k (and split) sum, unless the down GEMM writes out directly
    deterministic: bool
    programmatic_launch: bool
    decode: DecodeLaunch | None = None  # set: the layout, then this one kernel (gate_up/down give its GEMMs' shapes)
    gemv: tuple[GemvLaunch, GemvLaunch] | None = None  # set: these two launches (gate/up, down) and nothing else

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def direct(self) -> bool:
        """The down GEMM writes the output rows itself (deterministic, top-1, unsplit)."""
        return self.deterministic and self.combine is None and self.decode is None and self.gemv is None

    @property
    def accumulates(self) -> bool:
        """The down GEMM adds fp32 rows atomically into an accumulator (deterministic=False, unfused)."""
        return not self.deterministic and self.decode is None and self.gemv is None

    @property
    def workspace_elements(self) -> int:
        """bf16 workspace: the hidden rows h (R, F), then the down GEMM's per-(token, slot) rows Y (splits, R, H)
        when they are summed afterwards (by hare_combine, or inside the fused decode kernel; the few-token path has
        neither: its down kernel sums the slots itself)."""
        y = self.down.splits * self.rows * self.hidden if self.combine is not None or self.decode else 0
        return self.rows * self.ffn + y

    @property
    def partial_elements(self) -> int:
        """fp32 gate/up partial sums (splits, R, 2F) of a split gate/up GEMM."""
        return self.gate_up.splits * self.rows * 2 * self.ffn if self.gate_up.splits > 1 and self.gemv is None else 0


def layout_plan(R: int, E: int, slots: int) -> LayoutPlan:
    """The layout build of R rows over E experts into `slots` row-block slots."""
    tiles = -(-max(R, 1) // LAYOUT_TILE_ITEMS)
    sizes = (E, E + 1, R, R, R, slots, slots, slots, 1, tiles * E)
    offsets, o = [], 0
    for n in sizes:
        offsets.append(o)
        o += n
    count = SmallLaunch("hare_layout_count", tiles, 4 * (8 * E + tiles * E + 4 * E))
    scatter = SmallLaunch("hare_layout_scatter", tiles, 4 * 8 * E) if tiles > 1 else None
    # the last CTA of layout_count holds a tiles x E table in shared memory; larger T·k·E take the torch-ops layout
    return LayoutPlan(tiles, tuple(offsets), o, count.smem <= LAYOUT_SMEM_CAP, count, scatter)


def plan_moe(tokens: int, top_k: int, experts: int, hidden: int, ffn: int, gate_up: WeightFormat,
             down: WeightFormat, activation: str, deterministic: bool, num_sms: int,
             config: LaunchConfig = DEFAULT_CONFIG) -> MoePlan:
    """The launches of hare.gpu.fused_moe for these shapes (tokens >= 1) on a GPU of num_sms SMs: the layout, then
    the fused decode kernel (dense weights at DECODE_MIN_ROWS..DECODE_MAX_ROWS rows, or as the config says; both
    projections' weights must be read alike) or the GEMMs and their combines."""
    T, k, E, H, F = tokens, top_k, experts, hidden, ffn
    R = T * k
    n = config.tile_n or choose_block_n(R, E, gate_up.sparse or down.sparse)
    same_kind = gate_up.kind("gateup") == down.kind("down")
    fused = config.fused_decode
    if fused is None:
        dense = not gate_up.sparse and not down.sparse
        fused = dense and DECODE_MIN_ROWS <= R <= DECODE_MAX_ROWS and n in DECODE_TILE_NS
    elif fused and not same_kind:
        raise InvalidArgumentError(f"LaunchConfig.fused_decode: the fused decode kernel reads both projections' "
                                   f"weights the same way, here {gate_up.kind('gateup')} and {down.kind('down')}")
    elif fused and n not in DECODE_TILE_NS:
        n = max(t for t in DECODE_TILE_NS if t <= n)
    slots = max_blocks(R, E, n)
    raster = config.raster or DEFAULT_RASTER

    def splits(override, tiles, k_stages):
        if override is not None:
            return normalize_splits(override, k_stages)
        return 1 if R > SPLIT_MAX_ROWS else best_splits(tiles, k_stages, num_sms)

    def gemm(projection, epilogue, fmt, tiling, s):
        grid = max(1, min(num_sms, slots * tiling.num_m * s))
        kind = fmt.kind(projection)
        return GemmLaunch(gemm_kernel(projection, epilogue, kind, n), grid, gemm_smem_bytes(n, kind), s,
                          -(-fmt.k_stages // s), raster, tiling)

    gu_tiling = Tiling.of(gate_up.pairing("gateup"), 2 * F, gate_up.panels)
    dn_tiling = Tiling.of(down.pairing("down"), H, down.panels)
    gs = splits(config.gateup_splits, slots * gu_tiling.num_m, gate_up.k_stages)  # tiles over every row-block slot
    ds = splits(config.down_splits, slots * dn_tiling.num_m, down.k_stages)
    elementwise = lambda total: max(1, min(-(-total // SMALL_THREADS), 8 * num_sms))  # noqa: E731
    unit, alpha, limit = gated_unit(activation)
    glu = SmallLaunch(f"hare_glu_combine_{unit}", elementwise(R * F)) if gs > 1 else None
    direct = deterministic and k == 1 and ds == 1
    combine = SmallLaunch("hare_combine", elementwise(T * H // 8)) if deterministic and not direct else None
    gu_launch = gemm("gateup", unit, gate_up, gu_tiling, gs)
    dn_launch = gemm("down", "det" if deterministic else "fast", down, dn_tiling, ds)
    decode = None
    if fused:  # one launch after the layout: its own split / combine / accumulator handling (csrc/decode.cuh)
        kind = gate_up.kind("gateup")
        tiles = slots * (gu_tiling.num_m * gs + dn_tiling.num_m * ds)
        decode = DecodeLaunch(decode_kernel(kind, n), max(1, min(num_sms, tiles)), gemm_smem_bytes(n, kind),
                              activation_code(unit), slots, slots * gu_tiling.num_m, T * dn_tiling.num_m, tiles)
        glu = combine = None
    gemv = plan_gemv(T, k, H, F, gate_up, down, num_sms, config)
    if gemv is not None:
        glu = combine = decode = None
    return MoePlan(T, k, E, H, F, n, slots, layout_plan(R, E, slots), gu_launch, (alpha, limit), glu, dn_launch,
                   combine, deterministic, config.programmatic_launch, decode, gemv)


def gemv_rows(R: int, H: int, F: int, gate_up: "WeightFormat", down: "WeightFormat") -> bool:
    """Whether R (token, slot) rows are few enough for the few-token path by default: GEMV_MAX_ROWS, or
    GEMV_SPARSE_ROWS where both projections keep at most GEMV_SPARSE_KEPT of their K columns."""
    thin = all(f.sparse and (f.kept << f.bw_log2) <= GEMV_SPARSE_KEPT * K for f, K in ((gate_up, H), (down, F)))
    return R <= GEMV_MAX_ROWS or (thin and R <= GEMV_SPARSE_ROWS)


def plan_gemv(T: int, k: int, H: int, F: int, gate_up: "WeightFormat", down: "WeightFormat", num_sms: int,
              config: LaunchConfig = DEFAULT_CONFIG) -> tuple[GemvLaunch, GemvLaunch] | None:
    """The few-token path's two launches, or None where the plan runs the layout and GEMMs: where it measured faster
    (GEMV_MAX_ROWS above) unless the config overrides a GEMM choice, or when LaunchConfig.gemv says; top-k up to
    GEMV_MAX_TOP_K, and on Block N:M weights the activations a CTA stages must fit its shared memory."""
    sfx = lambda fmt: "_sp" if fmt.sparse else ""  # noqa: E731
    staged = lambda fmt, n: 2 * n if fmt.sparse else 0  # noqa: E731 (bf16 activations in shared memory)
    down_chunks = gemv_chunks(down, F)
    launches = (gemv_launch(f"hare_gemv_gateup{sfx(gate_up)}", T * k, F, 2, gemv_chunks(gate_up, H),
                            staged(gate_up, H), num_sms),
                gemv_launch(f"hare_gemv_down{sfx(down)}", T, H, k, down_chunks, staged(down, k * F), num_sms,
                            GEMV_DOWN_CTAS_PER_SM * num_sms if down_chunks >= GEMV_DOWN_CAP_CHUNKS else None))
    fits = k <= GEMV_MAX_TOP_K and max(g.smem for g in launches) <= SMEM_LIMIT
    want = config.gemv
    if want is None:
        want = fits and not config.gemm_overrides and gemv_rows(T * k, H, F, gate_up, down) and \
            3 * H * F <= GEMV_MAX_EXPERT and not (gate_up.all_kept or down.all_kept)
    elif want and not fits:
        raise InvalidArgumentError(f"LaunchConfig.gemv: the few-token path takes top_k <= {GEMV_MAX_TOP_K} and, on "
                                   f"Block N:M weights, top_k x ffn (here {k} x {F}) rows of h in shared memory")
    return launches if want else None


# ------------------------------------------------------------------------------------------- kernel ABI
# The argument structs the kernels receive, written once: _build generates their C++ definitions
# (hare_params.cuh) and the GEMM entry points from these tables; the launch path packs them with `pack`.
_FORMATS = {"long long": "q", "int": "i", "float": "f"}  # everything else named here is a pointer
_SIZES = {"int": 4, "float": 4}  # everything else is 8 bytes


@dataclass(frozen=True)
class ParamStruct:
    name: str
    fields: tuple[tuple[str, str, str], ...]  # (C++ type, field name, comment)

    def __post_init__(self):
        sizes = [_SIZES.get(t, 8) for t, _, _ in self.fields]
        if sizes != sorted(sizes, reverse=True):  # 8-byte fields first: no interior padding to mirror
            raise ValueError(f"{self.name}: 8-byte fields must precede int fields")
        fmt = "<" + "".join(_FORMATS.get(t, "Q") for t, _, _ in self.fields)
        pad = -struct.calcsize(fmt) % 8  # the struct's alignment is 8
        object.__setattr__(self, "_struct", struct.Struct(fmt + "x" * pad))

    @property
    def size(self) -> int:
        return self._struct.size

    def pack(self, *values) -> bytes:
        return self._struct.pack(*values)

    def unpack(self, data: bytes) -> tuple:
        return self._struct.unpack(data)

    def cpp(self) -> str:
        lines = [f"struct {self.name} {{"]
        for t, name, comment in self.fields:
            lines.append(f"  {t} {name};" + (f"  // {comment}" if comment else ""))
        return "\n".join(lines + ["};"])


GEMM_PARAMS = ParamStruct("GemmParams", (
    ("const __nv_bfloat16*", "b_src", "gate/up: x (T, H); down: intermediate (R, F)"),
    ("void*", "out", "gate/up: h (R, F) bf16 or fp32 partials (splits, R, 2F); down det: Y (splits, R, H) bf16 or "
                     "out (T, H); down fast: fp32 accumulator (T, H)"),
    ("const int*", "gather_index", "(R,) source token of each sorted row"),
    ("const int*", "row_assignment", "(R,) flat t*k+j of each sorted row"),
    ("const float*", "topk_weights", "(T*k,) routing weights (down)"),
    ("const int*", "block_expert", ""),
    ("const int*", "block_start", ""),
    ("const int*", "block_height", ""),
    ("const int*", "num_blocks", ""),
    ("const int*", "block_idx", "sparse: (E, panels, kept) kept K-block indices of each 128-row weight panel"),
    ("const float*", "bias", "fp32 expert bias or null: gate/up (E, 2F), down (E, H)"),
    ("long long", "out_split_stride", "elements between K-split slices of `out` (split gate/up, down det)"),
    ("int", "K", "row length of b_src: H (gate/up) or F (down)"),
    ("int", "M", "valid out-dim: F (gate/up) or H (down); also the row stride of `out`"),
    ("int", "a_rows_per_expert", "rows of one expert in the 2-D weight tensor map: 2F or H"),
    ("int", "a_box1_offset", "row offset of box 1: F (gate/up), 128 (down) or H/2 (down, joint halves)"),
    ("int", "m_tile", "out-dim rows from one M tile to the next: 128 (gate/up, down joint halves) or 256 (down)"),
    ("int", "num_m", "M tiles per expert"),
    ("int", "splits", "K splits (decode: too few tiles to fill the GPU otherwise)"),
    ("int", "k_blocks_per_split", "pipeline stages (64 logical K columns each) per split"),
    ("int", "top_k", ""),
    ("int", "num_rows", "R = T*k"),
    ("int", "group", "tile order (scheduler.cuh)"),
    ("int", "k_stages", "stages over all of K: K / 64 (dense), ceil(kept * bw / 64) (sparse)"),
    ("int", "kept", "sparse: kept K blocks per panel"),
    ("int", "bw_log2", "sparse: log2 of the block width bw"),
    ("int", "panels", "sparse: 128-row panels per expert"),
    ("int", "box1_panel_offset", "sparse: panel of box 1 minus that of box 0: P/2 (gate/up: up panel m, down joint "
                                 "halves), 1 (down)"),
    ("int", "all_kept", "sparse 1:1 (every K block kept): the token columns are read contiguously"),
    ("int", "num_experts", "E (the debug build's index checks)"),
    ("int", "num_slots", "B: row-block slots of the layout (the debug build's index checks)"),
    ("float", "act_alpha", "gate/up: the gated unit's alpha (gpt-oss)"),
    ("float", "act_limit", "gate/up: the gated unit's clamp limit (clamped-silu, gpt-oss)"),
))
LAYOUT_PARAMS = ParamStruct("LayoutParams", (
    ("const void*", "topk_ids", ""),
    *(("int*", f, s) for f, s in (("counts", "(E,)"), ("offsets", "(E+1,)"), ("gather_index", "(R,)"),
                                   ("row_assignment", "(R,)"), ("assignment_row", "(R,)"), ("block_expert", "(B,)"),
                                   ("block_start", "(B,)"), ("block_height", "(B,)"), ("num_blocks", "(1,)"),
                                   ("tile_base", "(num_tiles, E) workspace"))),
    ("unsigned int*", "ticket", "(1,) zero at first use; the last CTA resets it"),
    ("const void*", "weights_in", "(R,) the caller's routing weights (weights_dtype), or null"),
    ("float*", "weights_out", "(R,) the same as fp32, for the down GEMM (all NaN after a bad id), or null"),
    ("int*", "first_bad", "(1,) INT_MAX at rest: the first bad id's flat index (check_ids); the last CTA resets it"),
    ("long long*", "status", "the device's host-mapped error record (check_ids; layout.cuh StatusWord)"),
    ("int", "ids_is_64", ""),
    ("int", "num_rows", ""),
    ("int", "top_k", ""),
    ("int", "num_experts", ""),
    ("int", "block", ""),
    ("int", "num_slots", ""),
    ("int", "tile_items", "kLayoutTileItems (checked)"),
    ("int", "num_tiles", ""),
    ("int", "weights_dtype", "weights_in: 0 fp32, 1 bf16, 2 fp16, 3 fp64"),
    ("int", "check_ids", "1: check every id (range, repeats within a token), record the first bad one"),
))
COMBINE_PARAMS = ParamStruct("CombineParams", (
    ("const __nv_bfloat16*", "y", "(splits, R, H) per-(token, slot) rows"),
    ("__nv_bfloat16*", "out", "(T, H)"),
    ("long long", "split_stride", ""),
    ("int", "num_tokens", ""),
    ("int", "hidden", ""),
    ("int", "top_k", ""),
    ("int", "splits", ""),
))
GLU_COMBINE_PARAMS = ParamStruct("GluCombineParams", (
    ("const float*", "part", "(splits, R, 2F) fp32 partial gate | up sums"),
    ("__nv_bfloat16*", "h", "(R, F)"),
    ("long long", "split_stride", ""),
    ("int", "num_rows", ""),
    ("int", "ffn", ""),
    ("int", "splits", ""),
    ("float", "alpha", "the gated unit's parameters (GemmParams::act_alpha, act_limit)"),
    ("float", "limit", ""),
))
DECODE_PARAMS = ParamStruct("DecodeParams", (
    ("__nv_bfloat16*", "h", "(R, F): written by the last gate/up split (the gate/up GemmParams' out holds the fp32 "
                            "partials then)"),
    ("__nv_bfloat16*", "out", "(T, H)"),
    ("int*", "block_ready", "(B,) gate/up M tiles of each row block whose h is written"),
    ("int*", "tile_count", "(B, gate/up num_m) splits of each gate/up tile done"),
    ("int*", "token_count", "(T, down num_m) rows of each (token, down M tile) in Y"),
    ("unsigned int*", "exit_ticket", "(1,) CTAs done"),
    ("long long*", "trace", "null, or (tiles, 4) global-timer marks per tile (csrc/decode.cuh TraceMark)"),
    ("int", "activation", "the gated unit (Activation)"),
))
GEMV_PARAMS = ParamStruct("GemvParams", (
    ("const __nv_bfloat16*", "src", "gate/up: x (T, H); down: h (R, F)"),
    ("__nv_bfloat16*", "dst", "gate/up: h (R, F); down: out (T, H)"),
    ("const __nv_bfloat16*", "w", "dense weights (E, rows, K), or Block N:M values (E, rows, width)"),
    ("const unsigned char*", "meta", "Block N:M: 2:4 metadata (E, ceil(rows / 16), meta_stride)"),
    ("const int*", "block_idx", "Block N:M: (E, panels, kept) kept K blocks"),
    ("const float*", "bias", "fp32 (E, rows) expert bias or null"),
    ("int", "K", "input length: H (gate/up) or F (down)"),
    ("int", "M", "units per row: F (gate/up) or H (down)"),
    ("int", "rows", "weight rows per expert: 2F (gate/up) or H (down)"),
    ("int", "width", "stored values per weight row: K (dense) or kept * bw / 2 (Block N:M)"),
    ("int", "meta_stride", "Block N:M: metadata bytes per 16-row group"),
    ("int", "kept", "Block N:M: kept K blocks per panel"),
    ("int", "bw_log2", "Block N:M: log2 of the block width"),
    ("int", "panels", "Block N:M: panels per expert"),
    ("int", "half_rows", "Block N:M: rows from which panels count from half_panel (gate/up: F, the up rows)"),
    ("int", "half_panel", "Block N:M: P/2"),
    ("int", "lanes_log2", "GemvLaunch"),
    ("int", "segments", "GemvLaunch"),
    ("int", "units_per_cta", "GemvLaunch"),
    ("int", "ctas_per_row", "GemvLaunch"),
    ("int", "activation", "gate/up: the gated unit (Activation)"),
    ("float", "act_alpha", "gate/up: the gated unit's alpha"),
    ("float", "act_limit", "gate/up: the gated unit's clamp limit"),
))
PARAM_STRUCTS = (GEMM_PARAMS, LAYOUT_PARAMS, COMBINE_PARAMS, GLU_COMBINE_PARAMS, DECODE_PARAMS, GEMV_PARAMS)


def generated_sources() -> dict[str, str]:
    """The C++ that _build generates from the tables above: the argument structs, every GEMM entry point and the
    split gate/up combine of every gated unit (HARE_SMALL_KERNEL: hare_kernels.cu)."""
    enum = ", ".join(f"{e} = {i}" for i, (_, e) in enumerate(GATE_UP_UNITS.values()))
    consts = (f"// the few-token path's (csrc/gemv.cuh), as the plan sizes its launches\n"
              f"constexpr int kGemvThreads = {GEMV_THREADS};\nconstexpr int kGemvBatch = {GEMV_CHUNKS_PER_LANE};  "
              f"// chunks in flight per lane\nconstexpr int kGemvMaxTopK = {GEMV_MAX_TOP_K};  // the down kernel's "
              f"shared slots\n\n")
    params = f"enum Activation : int {{ {enum} }};\n\n" + consts + "\n\n".join(s.cpp() for s in PARAM_STRUCTS)
    entries = []
    for proj, epi, kind, n in gemm_variants():
        proj_enum, epi_enums = GEMM_VARIANTS[proj]
        _, sparse, shared_b = WEIGHT_KINDS[kind]
        maps = "const __grid_constant__ CUtensorMap tmap_a" + (
            ", const __grid_constant__ CUtensorMap tmap_meta" if kind != "dense" else "")
        entries.append(
            f'extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) {gemm_kernel(proj, epi, kind, n)}('
            f"{maps}, const GemmParams p) {{\n"
            f"  moe_gemm_body<{n}, {proj_enum}, {epi_enums[epi]}, {sparse}, {shared_b}>(&tmap_a, "
            f"{'&tmap_meta' if kind != 'dense' else 'nullptr'}, p);\n}}")
    for name, enum in GATE_UP_UNITS.values():
        entries.append(f"HARE_SMALL_KERNEL(hare_glu_combine_{name}, 256, GluCombineParams, glu_combine<{enum}>)")
    for kind, (_, sparse, shared_b) in WEIGHT_KINDS.items():
        maps = ("gu_a", "gu_meta", "dn_a", "dn_meta") if kind != "dense" else ("gu_a", "dn_a")
        args = ", ".join(f"&{m}" if m in maps else "nullptr" for m in ("gu_a", "gu_meta", "dn_a", "dn_meta"))
        for n in DECODE_TILE_NS:
            entries.append(
                f'extern "C" __global__ void __launch_bounds__(kGemmThreads, 1) {decode_kernel(kind, n)}('
                + "".join(f"const __grid_constant__ CUtensorMap {m}, " for m in maps)
                + "const GemmParams gu, const GemmParams dn, const DecodeParams dp) {\n"
                f"  decode_body<{n}, {sparse}, {shared_b}>({args}, gu, dn, dp);\n}}")
    head = "// Generated by hare/gpu/plan.py (generated_sources): do not edit.\n#pragma once\n"
    return {
        "hare_params.cuh": f"{head}#include <cuda_bf16.h>\n\nnamespace hare {{\n\n{params}\n\n}}  // namespace hare\n",
        "hare_entry_points.cuh": f"{head}\n" + "\n".join(entries) + "\n",
    }
