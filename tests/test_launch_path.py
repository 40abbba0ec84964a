"""CPU test of hare.gpu's launch path (plan -> allocate -> launch) under a fake CUDA driver: the kernels launched, in
order, with the plan's grids and shared memory, and every address handed to a kernel inside a tensor of the call."""

import ctypes
import importlib
import sys
import unittest.mock as um

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hare
import hare.gpu as hg
from hare.gpu import plan


class _Allocations(TorchDispatchMode):
    """Every tensor a call creates, as (pointer, bytes)."""

    def __init__(self):
        super().__init__()
        self.ranges = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel():
                self.ranges.append((t.data_ptr(), t.numel() * t.element_size()))
        return out


class _Device:
    """A device module (hare.gpu._launch._Module) that records launches: the id check's state as CPU tensors (the
    error record a host tensor the test writes as the kernel would), and the launches of a prepared call decoded
    from its argument buffer as the kernels would read them."""

    num_sms = 132

    def __init__(self):
        self.ticket = torch.zeros(1, dtype=torch.int32)
        self.first_bad = torch.full((1,), 2 ** 31 - 1, dtype=torch.int32)
        self.status_words = torch.zeros(16, dtype=torch.int64)
        self.status = (ctypes.c_longlong * 16).from_address(self.status_words.data_ptr())
        self.status_ptr = self.status_words.data_ptr()
        self.counters = torch.zeros(1 << 16, dtype=torch.int32)
        self.launches = []

    def decode_counters(self, n):
        assert n <= self.counters.numel()
        return self.counters.data_ptr()

    def launch(self, name, grid, block, smem, stream, pdl, *params):
        self.launches.append((name, grid, block, smem, pdl, params))

    def run(self, prog, stream, buf):
        data = bytes(buf.data)
        for k in prog.launches:
            self.launch(k.kernel, k.grid, k.block, k.smem, stream, prog.pdl, *k.maps,
                        *(data[o:o + n] for o, n in k.structs))


@pytest.fixture
def device(monkeypatch):
    driver = um.MagicMock()
    bindings = um.MagicMock(driver=driver)
    for name, mod in (("cuda", um.MagicMock(bindings=bindings)), ("cuda.bindings", bindings),
                      ("cuda.bindings.driver", driver)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "hare.gpu._launch", raising=False)
    launch = importlib.import_module("hare.gpu._launch")
    dev = _Device()
    monkeypatch.setattr(launch, "module", lambda d: dev)
    monkeypatch.setattr(launch, "current_stream", lambda d: 0)
    monkeypatch.setattr(launch, "tensor_map_2d", lambda t, rows, cols, *box: ("tmap", t.data_ptr(), rows, cols, *box))
    yield dev
    sys.modules.pop("hare.gpu._launch", None)  # later imports get the real module (or its ImportError) again
    if hasattr(hg, "_launch"):
        delattr(hg, "_launch")


_FAMILY = {"hare_layout": plan.LAYOUT_PARAMS, "hare_combine": plan.COMBINE_PARAMS, "hare_glu": plan.GLU_COMBINE_PARAMS}


def _fields(name, buf, s=None):
    s = s or next((v for k, v in _FAMILY.items() if name.startswith(k)), plan.GEMM_PARAMS)
    return s, dict(zip((f for _, f, _ in s.fields), s.unpack(bytes(buf))))


CASES = [  # (T, H, F, E, k, gate_up ratio or None, down ratio or None, deterministic, config[, unit, biased, joint])
    (1, 256, 128, 8, 2, None, None, True, None),
    (37, 320, 256, 6, 3, (1, 2), (1, 5), True, None),
    (300, 256, 128, 4, 1, None, (1, 1), True, None),  # top-1: the down GEMM writes out directly
    (5, 512, 256, 16, 2, (1, 10), None, False, hg.LaunchConfig(gateup_splits=3, down_splits=2)),
    (2100, 256, 128, 3, 2, (1, 1), (1, 2), True, hg.LaunchConfig(tile_n=64, raster=-2, programmatic_launch=False)),
    # biased GPT-OSS unit, ffn % 128 = 64 in the halves layout (three panels per half), split and unsplit
    (40, 320, 320, 8, 4, (1, 2), (1, 2), True, None, "gpt-oss:alpha=1.5,limit=3", True),
    (3, 320, 320, 8, 4, (1, 5), None, False, hg.LaunchConfig(gateup_splits=2, down_splits=2), "clamped-silu:limit=2",
     True),
    # joint panels: gate/up paired as halves, down (H % 256 == 0) as halves: its tiles pair panels m and m + P/2
    (50, 512, 320, 8, 2, (1, 2), (1, 5), True, None, "silu", False, True),
    # decode sizes on the unfused kernels, and the fused decode kernel with K splits, a set tile and no determinism
    (4, 512, 256, 16, 2, (1, 2), (1, 2), True, hg.LaunchConfig(fused_decode=False, gemv=False)),
    (20, 512, 256, 16, 3, None, None, True, None),  # dense, 60 rows: the fused decode kernel by default
    (9, 320, 320, 8, 4, (1, 2), (1, 5), True, hg.LaunchConfig(fused_decode=True), "gpt-oss:alpha=1.5,limit=3", True),
    (7, 512, 320, 8, 2, (1, 2), (1, 5), True, hg.LaunchConfig(fused_decode=True), "silu", False, True),
    (6, 512, 256, 16, 2, None, None, False, hg.LaunchConfig(fused_decode=True, tile_n=32, gateup_splits=4,
                                                            down_splits=2), "gelu"),
    # the few-token path (case 0 too): Block N:M in the halves layout, a mixed pair with biases, forced at 40 rows
    (2, 320, 256, 6, 3, (1, 2), (1, 5), True, None),
    (1, 320, 320, 8, 4, (1, 5), None, False, None, "gpt-oss:alpha=1.5,limit=3", True),
    (10, 256, 128, 8, 4, None, (1, 2), True, hg.LaunchConfig(gemv=True)),
]


def _check_gemv_launch(name, block, params, e, p, inside, x, out, weight_bias, unit):
    """A few-token launch: its GemvParams (the plan's grid split, the weights' storage, the gated unit) and the
    LayoutParams it shares (ids, routing weights, the id check's record), every pointer inside the call's tensors."""
    wt, bias = weight_bias
    assert block == plan.GEMV_THREADS and len(params) == 2
    s, f = _fields(name, params[0], plan.GEMV_PARAMS)
    ls, lf = _fields(name, params[1], plan.LAYOUT_PARAMS)
    for struct, fields, nullable in ((s, f, ("meta", "block_idx", "bias")),
                                     (ls, lf, (*plan.LayoutPlan.FIELDS, "ticket", "first_bad"))):
        for t, field, _ in struct.fields:
            if t not in ("int", "long long", "float") and not (field in nullable and fields[field] == 0):
                assert inside(fields[field]), f"{name}.{field} points outside every tensor of the call"
    assert (f["lanes_log2"], f["segments"], f["units_per_cta"], f["ctas_per_row"]) == (
        e.lanes_log2, e.segments, e.units_per_cta, e.ctas_per_row)
    assert f["bias"] == (0 if bias is None else bias.data_ptr())
    sparse = isinstance(wt, hare.BlockNM)
    assert ("_sp" in name) == sparse and f["w"] == (wt.values if sparse else wt).data_ptr()
    assert f["width"] == (wt.values.shape[2] if sparse else wt.shape[2])
    if "gateup" in name:
        assert f["src"] == x.data_ptr() and f["activation"] == plan.activation_code(plan.gated_unit(unit)[0])
        assert (f["act_alpha"], f["act_limit"]) == p.glu_args and f["half_rows"] == p.ffn
    else:
        assert f["dst"] == out.data_ptr() and f["M"] == p.hidden
    assert lf["num_rows"] == p.rows and lf["top_k"] == p.top_k and lf["weights_out"] != 0


@pytest.mark.parametrize("case", CASES)
def test_launches_follow_the_plan_and_stay_inside_the_call_tensors(device, case):
    """Each call's launches follow the plan, and every address is inside a tensor of that call."""
    defaults = ("silu", False, False)  # unit, biased, joint
    T, H, F, E, k, gu_ratio, dn_ratio, det, config, unit, biased, joint = (*case, *defaults[len(case) - 9:])
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    wgu = (torch.randn(E, 2 * F, H, generator=g) * H ** -0.5).bfloat16()
    wd = (torch.randn(E, H, F, generator=g) * F ** -0.5).bfloat16()
    jgu, jdn = ("halves", "halves") if joint else (None, None)
    gu = hare.sparsify(wgu, bn=gu_ratio[0], bm=gu_ratio[1], bw=16, halves=True, joint=jgu) if gu_ratio else wgu
    dn = hare.sparsify(wd, bn=dn_ratio[0], bm=dn_ratio[1], bw=32, joint=jdn) if dn_ratio else wd
    bgu, bd = (torch.randn(E, 2 * F, generator=g), torch.randn(E, H, generator=g)) if biased else (None, None)
    kept = []
    for call in range(2):  # the second call (same program, fresh tensors, the first kept alive) patches its own
        if call:
            kept.append((x, ids, w, bgu, bd))
            x, ids, w = x.clone(), ids.clone(), w.clone()
            bgu, bd = (None if b is None else b.clone() for b in (bgu, bd))
            device.launches.clear()
        allocs = _Allocations()
        with allocs:
            out = hg.run_fused_moe(x, ids, w, gu, dn, unit, det, config, bgu, bd)
        assert out.shape == (T, H) and out.dtype == torch.bfloat16

        fmt = lambda wt, K: plan.WeightFormat.of(K, wt.block_idx, wt.bw, wt.joint) if isinstance(wt, hare.BlockNM) \
            else plan.WeightFormat.of(K)  # noqa: E731
        p = plan.plan_moe(T, k, E, H, F, fmt(gu, H), fmt(dn, F), unit, det, device.num_sms,
                          config or hg.LaunchConfig())
        expected = list(p.gemv) if p.gemv else [p.layout.count, p.layout.scatter] + (
            [p.decode] if p.decode else [p.gate_up, p.glu_combine, p.down, p.combine])
        expected = [e for e in expected if e is not None]
        if config is None:  # by default the fused decode kernel takes dense weights at a measured range of rows
            dense = fmt(gu, H).kind("gateup") == fmt(dn, F).kind("down") == "dense"
            assert (p.decode is not None) == (dense and plan.DECODE_MIN_ROWS <= T * k <= plan.DECODE_MAX_ROWS)
        assert [name for name, *_ in device.launches] == [e.kernel for e in expected]
        inputs = [x, ids, w, device.ticket, device.first_bad, device.status_words, device.counters,
                  *(b for b in (bgu, bd) if b is not None)] + [t for wt in (gu, dn) for t in (
            (wt.values, wt.meta, wt.block_idx) if isinstance(wt, hare.BlockNM) else (wt,))]
        ranges = allocs.ranges + [(t.data_ptr(), t.numel() * t.element_size()) for t in inputs]
        inside = lambda v: any(a <= v < a + n for a, n in ranges)  # noqa: E731
        for (name, grid, block, smem, pdl, params), e in zip(device.launches, expected):
            assert grid == e.grid and smem == e.smem and pdl == p.programmatic_launch
            if isinstance(e, plan.GemvLaunch):
                _check_gemv_launch(name, block, params, e, p, inside, x, out, (gu, bgu) if "gateup" in name else (dn, bd),
                                   unit)
                continue
            decode = isinstance(e, plan.DecodeLaunch)
            assert block == (plan.GEMM_THREADS if isinstance(e, (plan.GemmLaunch, plan.DecodeLaunch))
                             else plan.SMALL_THREADS)
            assert all(inside(prm[1]) for prm in params if isinstance(prm, tuple))  # the weight tensor maps
            structs = [prm for prm in params if not isinstance(prm, tuple)]
            # (struct, the GemmLaunch it describes, whether it is the gate/up GEMM's) of each argument struct
            roles = [(plan.GEMM_PARAMS, p.gate_up, True), (plan.GEMM_PARAMS, p.down, False),
                     (plan.DECODE_PARAMS, None, False)] if decode else \
                [(None, e if isinstance(e, plan.GemmLaunch) else None, name.startswith("hare_gateup"))]
            assert len(structs) == len(roles)
            for prm, (role, gl, gate_up) in zip(structs, roles):
                s, f = _fields(name, prm, role)
                for t, field, _ in s.fields:
                    nullable = field in ("block_idx", "bias", "trace") and f[field] == 0
                    if t not in ("int", "long long", "float") and not nullable:
                        assert inside(f[field]), f"{name}.{field} points outside every tensor of the call"
                if s is plan.DECODE_PARAMS:
                    assert f["activation"] == plan.activation_code(plan.gated_unit(unit)[0])
                    assert f["exit_ticket"] == device.counters.data_ptr() and f["out"] == out.data_ptr()
                    assert f["token_count"] - f["block_ready"] == 4 * (p.decode.block_ready + p.decode.tile_count)
                if gl is not None:
                    e = gl
                    assert (f["splits"], f["k_blocks_per_split"], f["group"]) == (e.splits, e.k_per_split, e.raster)
                    assert (f["num_rows"], f["top_k"], f["num_experts"], f["num_slots"]) == (T * k, k, E, p.slots)
                    bias = bgu if gate_up else bd
                    assert f["bias"] == (0 if bias is None else bias.data_ptr())
                    wt = gu if gate_up else dn
                    if isinstance(wt, hare.BlockNM):  # box 1 reads up panel m (P/2 + m), down panel 2m + 1 or m + P/2
                        halves = gate_up or wt.joint == "halves"
                        assert f["box1_panel_offset"] == (wt.block_idx.shape[1] // 2 if halves else 1)
                        assert (f["m_tile"], f["a_box1_offset"]) == ((128, wt.shape[-2] // 2) if halves else (256, 128))
                        assert ("_spj_" in name) == (joint or wt.kept_blocks * wt.bw == wt.shape[-1])
                if gate_up or name.startswith("hare_glu"):
                    assert (f.get("act_alpha", f.get("alpha")), f.get("act_limit", f.get("limit"))) == p.glu_args
