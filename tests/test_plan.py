"""CPU tests of the launch plan (hare/gpu/plan.py): what hare.gpu.fused_moe launches, chosen in Python."""

import random

import pytest

from hare.blocknm import JOINT, PANEL, joint_partner, panel_count, panel_of_rows
from hare.errors import InvalidArgumentError
from hare.gpu import plan
from hare.gpu.plan import LaunchConfig, WeightFormat, plan_moe
from hare.routing import max_blocks

SMS = 132
UNITS = ("silu", "gelu", "clamped-silu:limit=7", "gpt-oss", "gpt-oss:alpha=1.5,limit=3")  # one of each fused unit


def _format(K, sparse, rng):
    if not sparse:
        return WeightFormat.of(K)
    bw = rng.choice((16, 32, 64))
    kept = max(1, (K // bw) // rng.choice((1, 2, 5, 10)))

    class Idx:  # block_idx's shape is all a format reads
        shape = (4, 3, kept)
    return WeightFormat.of(K, Idx, bw, rng.choice(JOINT))


def _random_plans(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        H, F = 64 * rng.randint(1, 96), 64 * rng.randint(1, 240)
        E = rng.choice((1, 2, 8, 16, 64, 128, 256))
        k = rng.randint(1, min(8, E))
        T = rng.choice((1, 2, 7, 64, 300, 1000, 4096, 20000))
        gu, dn = _format(H, rng.random() < 0.5, rng), _format(F, rng.random() < 0.5, rng)
        act, det = rng.choice(UNITS), rng.random() < 0.7
        yield (T, k, E, H, F, gu, dn, act, det), plan_moe(T, k, E, H, F, gu, dn, act, det, SMS)


def _check_gemv(p, T, k, H, F, gu, dn, names):
    """The few-token path's launches cover every unit with one group of lanes per item, in the shared memory of their
    partial sums."""
    assert p.decode is None and p.glu_combine is None and p.combine is None and not p.accumulates and not p.direct
    assert p.workspace_elements == T * k * F and p.partial_elements == 0
    for g, fmt, K, rows, units, per_unit, proj in ((p.gemv[0], gu, H, T * k, F, 2, "gateup"),
                                                   (p.gemv[1], dn, F, T, H, k, "down")):
        assert g.kernel == f"hare_gemv_{proj}{'_sp' if fmt.sparse else ''}" and g.kernel in names
        lanes, chunks = 1 << g.lanes_log2, plan.gemv_chunks(fmt, K)
        assert lanes <= 32 and (lanes == 32 or lanes * plan.GEMV_CHUNKS_PER_LANE >= chunks)
        assert g.segments == -(-chunks // (lanes * plan.GEMV_CHUNKS_PER_LANE))
        assert g.ctas_per_row * g.units_per_cta >= units > (g.ctas_per_row - 1) * g.units_per_cta
        staged = 2 * (K if proj == "gateup" else k * F) if fmt.sparse else 0  # Block N:M: the activations
        assert g.grid == rows * g.ctas_per_row and g.smem == staged + 4 * g.units_per_cta * per_unit * g.segments
        if proj == "down" and chunks >= plan.GEMV_DOWN_CAP_CHUNKS:  # long rows: at most the resident CTAs
            assert g.grid <= max(T, plan.GEMV_DOWN_CTAS_PER_SM * SMS)
        assert g.smem <= plan.SMEM_LIMIT


def test_plans_keep_the_kernels_contract():
    names = set(plan.kernel_names())
    for (T, k, E, H, F, gu, dn, act, det), p in _random_plans(400):
        R = T * k
        assert p.rows == R and p.tile_n in plan.TILE_NS and p.slots == max_blocks(R, E, p.tile_n)
        for g, fmt, proj in ((p.gate_up, gu, "gateup"), (p.down, dn, "down")):
            assert g.kernel in names and (("_sp" in g.kernel) == fmt.sparse) and g.kernel.endswith(f"_bn{p.tile_n}")
            assert ("_spj_" in g.kernel) == (fmt.sparse and (fmt.all_kept or fmt.joint == fmt.pairing(proj)))
            assert 1 <= g.grid <= SMS and g.smem <= plan.SMEM_LIMIT
            # every split is non-empty and together they cover K exactly
            assert (g.splits - 1) * g.k_per_split < fmt.k_stages <= g.splits * g.k_per_split
            if R > plan.SPLIT_MAX_ROWS:
                assert g.splits == 1
        unit, alpha, limit = plan.gated_unit(act)
        assert p.gate_up.kernel.startswith(f"hare_gateup_{unit}") and p.glu_args == (alpha, limit)
        assert p.glu_combine is None or p.glu_combine.kernel == f"hare_glu_combine_{unit}"
        assert p.down.kernel.startswith("hare_down_det" if det else "hare_down_fast")
        kind = gu.kind("gateup")
        try:
            fits = plan.plan_gemv(T, k, H, F, gu, dn, SMS, LaunchConfig(gemv=True)) is not None
        except InvalidArgumentError:  # Block N:M down: top-k rows of h past the shared memory
            fits = False
        thin = all(f.sparse and f.kept * (1 << f.bw_log2) * 8 <= K for f, K in ((gu, H), (dn, F)))  # <= 1/8 kept
        gemv = fits and (R <= plan.GEMV_MAX_ROWS or (thin and R <= plan.GEMV_SPARSE_ROWS)) and \
            3 * H * F <= plan.GEMV_MAX_EXPERT and not (gu.all_kept or dn.all_kept)
        assert (p.gemv is not None) == gemv
        if gemv:  # two launches, no layout: h is all the workspace holds, nothing accumulates or is combined
            _check_gemv(p, T, k, H, F, gu, dn, names)
            continue
        assert p.partial_elements == (p.gate_up.splits * R * 2 * F if p.gate_up.splits > 1 else 0)
        fused = kind == dn.kind("down") == "dense" and plan.DECODE_MIN_ROWS <= R <= plan.DECODE_MAX_ROWS and \
            p.tile_n in plan.DECODE_TILE_NS
        assert (p.decode is not None) == fused and p.accumulates == (not det and not fused)
        if fused:  # one kernel after the layout: it splits, combines and sums the top-k rows itself (always in Y)
            d = p.decode
            assert d.kernel == plan.decode_kernel(kind, p.tile_n) and d.kernel in names and not p.direct
            assert p.glu_combine is None and p.combine is None and d.smem == plan.gemm_smem_bytes(p.tile_n, kind)
            tiles = p.slots * (p.gate_up.tiling.num_m * p.gate_up.splits + p.down.tiling.num_m * p.down.splits)
            assert d.grid == min(SMS, tiles) and d.tiles == tiles and d.activation == plan.activation_code(unit)
            assert (d.block_ready, d.tile_count, d.token_count) == (
                p.slots, p.slots * p.gate_up.tiling.num_m, T * p.down.tiling.num_m)
            assert p.workspace_elements == R * F + p.down.splits * R * H
            continue
        assert (p.glu_combine is not None) == (p.gate_up.splits > 1)
        # the deterministic top-k sum runs unless the down GEMM writes the output rows itself (top-1, unsplit)
        assert (p.combine is not None) == (det and not (k == 1 and p.down.splits == 1))
        assert p.workspace_elements == R * F + (p.down.splits * R * H if p.combine else 0)


def test_layout_buffer_holds_every_field_back_to_back():
    for (T, k, E, *_), p in _random_plans(100, seed=1):
        R, lay = T * k, p.layout
        sizes = (E, E + 1, R, R, R, p.slots, p.slots, p.slots, 1, lay.num_tiles * E)
        assert list(lay.offsets) == [sum(sizes[:i]) for i in range(len(sizes))] and lay.total == sum(sizes)
        assert lay.num_tiles == -(-R // plan.LAYOUT_TILE_ITEMS)
        assert (lay.scatter is not None) == (lay.num_tiles > 1)
        assert lay.on_device == (lay.count.smem <= plan.LAYOUT_SMEM_CAP)


def test_tile_width_follows_the_mean_rows_per_expert():
    assert plan.choose_block_n(1, 8) == 16  # decode: one row per touched expert
    assert plan.choose_block_n(2 * 8, 8) == 16 and plan.choose_block_n(13 * 8, 8) == 32
    assert plan.choose_block_n(4096 * 2, 8) == 128  # prefill
    assert plan.choose_block_n(512 * 6, 64) == 64  # DeepSeek-V2-Lite at 512 tokens: 48 rows per expert
    for R in range(1, 3000, 37):
        for E in (1, 8, 128):
            n = plan.choose_block_n(R, E)
            mean = R / min(E, R)
            assert n >= plan.TILE_HEADROOM * mean or n == 128
            assert n == 16 or plan.TILE_NS[plan.TILE_NS.index(n) - 1] < plan.TILE_HEADROOM * mean


def test_sparse_weights_take_64_row_tiles_up_to_wide_experts():
    for R, E in ((2048 * 8, 128), (512 * 2, 8), (2048 * 4, 60)):  # 128-136 mean rows: dense 128, sparse 64
        assert plan.choose_block_n(R, E) == 128 and plan.choose_block_n(R, E, sparse=True) == 64
    assert plan.choose_block_n(2048 * 2, 8, sparse=True) == 128  # Mixtral at 2048 tokens: 512 rows per expert
    for R in range(1, 5000, 41):  # never wider than the dense choice
        assert plan.choose_block_n(R, 8, sparse=True) <= plan.choose_block_n(R, 8)
    gu, dn = WeightFormat.of(2048), WeightFormat.of(768)
    sgu = WeightFormat(True, 16, kept=64, bw_log2=4, panels=12)
    assert plan_moe(2048, 8, 128, 2048, 768, gu, dn, "silu", True, SMS).tile_n == 128
    assert plan_moe(2048, 8, 128, 2048, 768, sgu, dn, "silu", True, SMS).tile_n == 64


def test_k_is_split_only_below_a_wave_of_tiles():
    gu, dn = WeightFormat.of(2048), WeightFormat.of(768)  # Qwen3-30B-A3B: one token touches 8 experts
    gemm = LaunchConfig(gemv=False)  # the GEMM path at one token
    decode = plan_moe(1, 8, 128, 2048, 768, gu, dn, "silu", True, SMS, gemm)  # 8 x 6 gate/up, 8 x 8 down tiles
    assert decode.gate_up.splits > 1 and decode.down.splits > 1 and decode.partial_elements > 0
    prefill = plan_moe(4096, 8, 128, 2048, 768, gu, dn, "silu", True, SMS)
    assert prefill.gate_up.splits == prefill.down.splits == 1 and prefill.glu_combine is None
    mixtral = plan_moe(1, 2, 8, 4096, 14336, WeightFormat.of(4096), WeightFormat.of(14336), "silu", True, SMS, gemm)
    assert mixtral.gate_up.splits == 1 < mixtral.down.splits  # 2 x 112 gate/up tiles fill a wave already


def test_the_fused_decode_kernel_takes_the_calls_it_measured_faster_on_or_as_told():
    dense, qgu, qdn = WeightFormat.of(2048), WeightFormat.of(2048), WeightFormat.of(768)
    sgu = WeightFormat(True, 8, kept=32, bw_log2=4, panels=12)  # Block N:M 1:2 gate/up (a tile: two panels)
    sdn = WeightFormat(True, 3, kept=12, bw_log2=4, panels=16)
    rows = plan.DECODE_MAX_ROWS // 8
    assert plan_moe(rows, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS).decode.kernel == "hare_decode_bn16"
    assert plan_moe(rows + 1, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS).decode is None
    assert plan_moe(2, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS).decode is None  # below DECODE_MIN_ROWS
    assert plan_moe(16, 8, 128, 2048, 768, sgu, sdn, "silu", False, SMS).decode is None  # sparse: when told
    told = plan_moe(16, 8, 128, 2048, 768, sgu, sdn, "silu", False, SMS, LaunchConfig(fused_decode=True))
    assert told.decode.kernel == "hare_decode_sp_bn16"
    mixed = plan_moe(16, 8, 128, 2048, 768, sgu, qdn, "silu", True, SMS)  # sparse gate/up, dense down: unfused
    assert mixed.decode is None and mixed.combine is not None
    with pytest.raises(InvalidArgumentError, match="reads both projections' weights the same way"):
        plan_moe(16, 8, 128, 2048, 768, sgu, qdn, "silu", True, SMS, LaunchConfig(fused_decode=True))
    forced = plan_moe(8192, 2, 8, 2048, 768, dense, qdn, "silu", True, SMS, LaunchConfig(fused_decode=True))
    assert forced.decode is not None and forced.tile_n == 64  # the widest tile it takes
    off = plan_moe(1, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS, LaunchConfig(fused_decode=False, gemv=False))
    assert off.decode is None and off.glu_combine is not None
    for bad in (dict(fused_decode=1), dict(fused_decode=True, tile_n=128)):
        with pytest.raises(InvalidArgumentError, match="LaunchConfig"):
            LaunchConfig(**bad)


def test_launch_config_overrides_and_refuses_bad_values():
    dense = WeightFormat.of(1024)
    cfg = LaunchConfig(tile_n=32, gateup_splits=3, down_splits=100, raster=-4, programmatic_launch=False)
    p = plan_moe(7, 3, 16, 1024, 1024, dense, dense, "gelu", False, SMS, cfg)
    assert p.tile_n == 32 and p.gate_up.splits == 3 and p.gate_up.raster == p.down.raster == -4
    assert p.down.splits == 16 and p.down.k_per_split == 1  # 100 splits of 16 stages: 16 non-empty ones
    assert p.programmatic_launch is False and p.gate_up.kernel == "hare_gateup_gelu_bn32"
    for bad in (dict(tile_n=48), dict(gateup_splits=0), dict(down_splits=True), dict(raster=0),
                dict(programmatic_launch=1)):
        with pytest.raises(InvalidArgumentError, match="LaunchConfig"):
            LaunchConfig(**bad)


def test_sparse_format_counts_kept_columns():
    class Idx:
        shape = (8, 4, 3)  # 3 kept blocks per panel
    f = WeightFormat.of(4096, Idx, 64)
    assert f.sparse and f.k_stages == 3 and f.kept == 3 and f.bw_log2 == 6 and f.panels == 4 and not f.all_kept
    assert f.kind("gateup") == f.kind("down") == "sparse"
    assert WeightFormat.of(192, Idx, 64).all_kept  # every block kept (1:1): one token tile, whatever the pairing
    assert WeightFormat.of(192, Idx, 64).kind("down") == "joint"
    assert WeightFormat.of(4096) == WeightFormat(False, 64) and WeightFormat.of(4096).kind("down") == "dense"
    halves, adjacent = WeightFormat.of(4096, Idx, 64, "halves"), WeightFormat.of(4096, Idx, 64, "adjacent")
    assert halves.kind("gateup") == halves.kind("down") == "joint"  # down then tiles panels m and m + P/2
    assert halves.pairing("down") == "halves" and adjacent.pairing("down") == "adjacent"
    assert adjacent.kind("down") == "joint" and adjacent.kind("gateup") == "sparse"  # gate/up must pair gate with up


@pytest.mark.parametrize("out, halves_layout", [(256, False), (384, False), (4096, False), (2880, False),
                                                (1408, True), (2 * 704, True), (2 * 2880, True)])
def test_tiles_cover_every_weight_row_once_and_joint_tiles_pair_partner_panels(out, halves_layout):
    """For each pairing a tiling can take: over its M tiles, the two 128-row boxes cover each weight row exactly once
    (rows past the last panel masked), each box lies in one panel, and a tile the plan runs as "joint" pairs panels
    that hare.blocknm makes keep the same blocks."""
    P = panel_count(out, halves_layout)
    row_panel = panel_of_rows(out, halves_layout).tolist()
    for pairing in ("halves", "adjacent"):
        if pairing == "halves" and P % 2:
            continue
        if pairing == "adjacent" and halves_layout:
            continue  # gate/up always pairs halves; a down weight in the halves layout has out % 256 == 0
        t = plan.Tiling.of(pairing, out, P)
        seen = []
        for m in range(t.num_m):
            for box, start in enumerate((m * t.m_tile, m * t.m_tile + t.box1_rows)):
                half_end = out // 2 if pairing == "halves" and box == 0 else out  # the epilogue's mask
                rows = [r for r in range(start, start + PANEL) if r < half_end]
                panel = min(m * (t.m_tile // PANEL) + box * t.box1_panel_offset, P - 1)  # the kernel's panel
                assert all(row_panel[r] == panel for r in rows), (pairing, m, box)
                seen += rows
        assert sorted(seen) == list(range(out))
        for joint in JOINT[1:]:
            fmt = WeightFormat.of(128, type("Idx", (), {"shape": (1, P, 1)}), 64, joint)  # 1 of 2 blocks kept
            proj = "gateup" if pairing == "halves" and joint != "halves" else "down"
            if fmt.pairing(proj) != pairing or fmt.kind(proj) != "joint":
                continue
            partner = joint_partner(P, joint).tolist()
            for m in range(t.num_m):
                p0 = min(m * (t.m_tile // PANEL), P - 1)
                p1 = min(p0 + t.box1_panel_offset, P - 1)
                assert partner[p0] == p1 or p0 == p1


def test_one_variant_table_names_every_kernel_and_entry_point():
    names = plan.kernel_names()
    gemms = sum(len(epis) for _, epis in plan.GEMM_VARIANTS.values()) * len(plan.WEIGHT_KINDS) * len(plan.TILE_NS)
    decodes = len(plan.WEIGHT_KINDS) * len(plan.DECODE_TILE_NS)
    assert len(names) == len(set(names)) == len(plan.SMALL_KERNELS) + len(plan.GEMV_KERNELS) + gemms + decodes
    entries = plan.generated_sources()["hare_entry_points.cuh"]
    for kind, (_, sparse, shared_b) in plan.WEIGHT_KINDS.items():  # the fused decode kernels: 2 or 4 tensor maps
        for n in plan.DECODE_TILE_NS:
            head, body = entries[entries.index(f" {plan.decode_kernel(kind, n)}("):].split("\n")[:2]
            assert head.count("CUtensorMap") == (2 if kind == "dense" else 4)
            assert f"decode_body<{n}, {sparse}, {shared_b}>(" in body
    for proj, (proj_enum, epis) in plan.GEMM_VARIANTS.items():
        for epi, epi_enum in epis.items():
            for kind, (_, sparse, shared_b) in plan.WEIGHT_KINDS.items():
                for n in plan.TILE_NS:
                    name = plan.gemm_kernel(proj, epi, kind, n)
                    assert f" {name}(" in entries
                    body = entries[entries.index(f" {name}("):].split("\n")[1]
                    assert f"moe_gemm_body<{n}, {proj_enum}, {epi_enum}, {sparse}, {shared_b}>" in body
    for name, enum in plan.GATE_UP_UNITS.values():  # every fused unit has its split-K combine
        assert f"HARE_SMALL_KERNEL(hare_glu_combine_{name}, 256, GluCombineParams, glu_combine<{enum}>)" in entries
        assert f"{enum} = {plan.activation_code(name)}" in plan.generated_sources()["hare_params.cuh"]


def test_gated_units_carry_their_parameters():
    assert plan.gated_unit("silu") == ("silu", 0.0, 0.0)
    assert plan.gated_unit("gpt-oss") == ("gpt_oss", 1.702, 7.0)  # GPT-OSS's defaults
    assert plan.gated_unit("gpt-oss:limit=5") == ("gpt_oss", 1.702, 5.0)
    assert plan.gated_unit("clamped-silu:limit=10") == ("clamped_silu", 0.0, 10.0)
    assert set(plan.FUSED_ACTIVATIONS) == {"silu", "gelu", "clamped-silu", "gpt-oss"}
    for bad in ("relu", "clamped-silu", "gpt-oss:beta=1", "gpt-oss:limit=x"):
        with pytest.raises(InvalidArgumentError):
            plan.gated_unit(bad)


def test_param_structs_pack_to_their_c_layout():
    gemm = plan.GEMM_PARAMS
    n_ptr = sum(t not in ("int", "long long", "float") for t, _, _ in gemm.fields)
    n4 = len(gemm.fields) - n_ptr - 1
    assert gemm.size == 8 * n_ptr + 8 + 4 * n4 + 4 * (n4 % 2)
    assert plan.GLU_COMBINE_PARAMS.size == 48  # 2 pointers, a long long, 3 ints, 2 floats and the tail padding
    alpha, limit = plan.GLU_COMBINE_PARAMS.unpack(plan.GLU_COMBINE_PARAMS.pack(1, 2, 3, 4, 5, 6, 1.5, 7.0))[-2:]
    assert (alpha, limit) == (1.5, 7.0)
    assert len(plan.LAYOUT_PARAMS.pack(*range(len(plan.LAYOUT_PARAMS.fields)))) == plan.LAYOUT_PARAMS.size
    with pytest.raises(ValueError, match="8-byte fields"):
        plan.ParamStruct("Bad", (("int", "a", ""), ("void*", "b", "")))
    header = plan.generated_sources()["hare_params.cuh"]
    for s in plan.PARAM_STRUCTS:
        assert f"struct {s.name} {{" in header and all(f" {name};" in header for _, name, _ in s.fields)
    for name, value in (("kGemvThreads", plan.GEMV_THREADS), ("kGemvBatch", plan.GEMV_CHUNKS_PER_LANE),
                        ("kGemvMaxTopK", plan.GEMV_MAX_TOP_K)):  # the few-token kernels' sizes, from the plan
        assert f"constexpr int {name} = {value};" in header


def test_the_few_token_path_runs_where_it_measured_faster_or_as_told():
    qgu, qdn = WeightFormat.of(2048), WeightFormat.of(768)  # Qwen3-30B-A3B
    sgu = WeightFormat(True, 8, kept=32, bw_log2=4, panels=12)  # Block N:M 1:4 of 2048 columns (25%)
    sdn = WeightFormat(True, 3, kept=12, bw_log2=4, panels=16)
    one = plan_moe(1, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS)
    assert [g.kernel for g in one.gemv] == ["hare_gemv_gateup", "hare_gemv_down"]
    thin_gu = WeightFormat(True, 4, kept=13, bw_log2=4, panels=12)  # 1:10 of 2048 columns (5%): 13 of 128 blocks
    thin_dn = WeightFormat(True, 2, kept=5, bw_log2=4, panels=16)  # of 768: 5 of 48
    # the dense down rows (96 chunks) take at most the resident CTAs; 1:10 rows (5 chunks) keep their waves
    assert one.gemv[1].grid <= plan.GEMV_DOWN_CTAS_PER_SM * SMS < plan.gemv_launch(
        "hare_gemv_down", 1, 2048, 8, plan.gemv_chunks(qdn, 768), 0, SMS).grid
    assert plan.gemv_chunks(thin_dn, 768) < plan.GEMV_DOWN_CAP_CHUNKS
    assert plan_moe(1, 8, 128, 2048, 768, qgu, thin_dn, "silu", True, SMS, LaunchConfig(gemv=True)).gemv[1] == \
        plan.gemv_launch("hare_gemv_down_sp", 1, 2048, 8, 5, 2 * 8 * 768, SMS)
    assert plan_moe(1, 8, 128, 2048, 768, sgu, sdn, "silu", True, SMS).gemv[1].kernel == "hare_gemv_down_sp"
    assert plan_moe(2, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS).gemv is None  # 16 rows
    for T, gu, dn, few in ((4, thin_gu, thin_dn, True), (5, thin_gu, thin_dn, False),  # 32 rows, 40 rows
                           (4, thin_gu, sdn, False), (4, sgu, thin_dn, False), (4, thin_gu, qdn, False)):
        assert (plan_moe(T, 8, 128, 2048, 768, gu, dn, "silu", True, SMS).gemv is not None) == few
    mixtral = WeightFormat.of(4096), WeightFormat.of(14336)
    assert plan_moe(1, 2, 8, 4096, 14336, *mixtral, "silu", True, SMS).gemv is None  # large experts
    all_kept = WeightFormat(True, 32, kept=128, bw_log2=4, panels=12, all_kept=True)  # 1:1 (50%)
    assert plan_moe(1, 8, 128, 2048, 768, all_kept, qdn, "silu", True, SMS).gemv is None
    assert plan_moe(1, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS, LaunchConfig(tile_n=16)).gemv is None
    forced = plan_moe(64, 8, 128, 2048, 768, qgu, qdn, "silu", True, SMS, LaunchConfig(gemv=True))
    assert forced.gemv is not None and forced.workspace_elements == 64 * 8 * 768
    with pytest.raises(InvalidArgumentError, match="gemv=True runs no GEMM"):
        LaunchConfig(gemv=True, tile_n=32)
    with pytest.raises(InvalidArgumentError, match="top_k <= 64"):
        plan_moe(1, 65, 128, 2048, 768, qgu, qdn, "silu", True, SMS, LaunchConfig(gemv=True))
    big_h = WeightFormat(True, 112, kept=448, bw_log2=4, panels=32)  # Block N:M down over ffn 14336, top-9
    with pytest.raises(InvalidArgumentError, match="rows of h in shared memory"):
        plan_moe(1, 9, 16, 4096, 14336, WeightFormat.of(4096), big_h, "silu", True, SMS, LaunchConfig(gemv=True))
