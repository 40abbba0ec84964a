"""CPU tests of the eager host path (issue 13): hare.moe's one-pass argument test, the prepared launches (programs)
and the device-side id check's host half (the error record, its message, check_errors), under the fake driver of
tests/test_launch_path.py."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hare
import hare.gpu as hg
from hare.errors import InvalidArgumentError
from hare.gpu import plan

from test_launch_path import _fields, device  # noqa: F401 (the fake driver fixture)

moe_module = sys.modules["hare.moe"]
ROOT = Path(__file__).resolve().parents[1]


def _case(T=12, H=256, F=128, E=8, k=2, sparse=False, gen=None, wdtype=torch.float32):
    g = gen or torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g).to(wdtype)
    wgu = (torch.randn(E, 2 * F, H, generator=g) * H ** -0.5).bfloat16()
    wd = (torch.randn(E, H, F, generator=g) * F ** -0.5).bfloat16()
    if sparse:
        wgu, wd = hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True), hare.sparsify(wd, bn=1, bm=2, bw=16)
    return x, ids, w, wgu, wd


def _layout_fields(device):
    name, *_, params = next(rec for rec in device.launches if rec[0] == "hare_layout_count")
    return _fields(name, params[-1])[1]


# ------------------------------------------------------------------------------------------- the argument pass
def _mutations(gen):
    """(name, arguments) of hare.moe calls, good and bad: the base case and one change at a time."""
    x, ids, w, wgu, wd = _case(T=6, H=64, F=32, E=4, k=2, gen=gen)
    x, w = x.float(), w.float()
    wgu, wd = wgu.float(), wd.float()
    sgu = hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True, dtype=torch.float32)
    sd = hare.sparsify(wd, bn=1, bm=2, bw=16, dtype=torch.float32)
    base = dict(x=x, topk_ids=ids, topk_weights=w, w_gate_up=wgu, w_down=wd, activation="silu", gate_up_bias=None,
                down_bias=None)
    changes = {
        "base": {}, "sparse": dict(w_gate_up=sgu, w_down=sd), "mixed": dict(w_gate_up=sgu),
        "biases": dict(gate_up_bias=torch.zeros(4, 64), down_bias=torch.zeros(4, 64, dtype=torch.float64)),
        "x int": dict(x=x.long()), "x 3d": dict(x=x[None]), "x list": dict(x=x.tolist()),
        "x bf16 vs weights": dict(x=x.bfloat16()), "x fewer cols": dict(x=x[:, :32]),
        "ids float": dict(topk_ids=ids.float()), "ids rows": dict(topk_ids=ids[:5], topk_weights=w[:5]),
        "ids 1d": dict(topk_ids=ids[:, 0]), "ids int8": dict(topk_ids=ids.to(torch.int8)),
        "weights shape": dict(topk_weights=w[:, :1]), "weights int": dict(topk_weights=ids),
        "weights f16": dict(topk_weights=w.half()), "weights 3d": dict(topk_weights=w[None]),
        "top-k > E": dict(topk_ids=torch.arange(5).repeat(6, 1), topk_weights=torch.rand(6, 5)),
        "activation unknown": dict(activation="swish"), "activation int": dict(activation=3),
        "activation clamped": dict(activation="clamped-silu:limit=2"),
        "activation bad param": dict(activation="gpt-oss:alpha=x"),
        "gate_up odd rows": dict(w_gate_up=wgu[:, :63]), "gate_up 2d": dict(w_gate_up=wgu[0]),
        "gate_up dtype": dict(w_gate_up=wgu.double()), "down shape": dict(w_down=wd[:, :, :16]),
        "down experts": dict(w_down=wd[:3]), "down list": dict(w_down=[wd]),
        "unstacked blocknm": dict(w_gate_up=hare.sparsify(wgu[0], bn=1, bm=2, bw=16, dtype=torch.float32)),
        "gate_up_bias shape": dict(gate_up_bias=torch.zeros(4, 63)), "gate_up_bias int": dict(gate_up_bias=ids),
        "down_bias 3d": dict(down_bias=torch.zeros(1, 4, 64)), "down_bias list": dict(down_bias=[0.0]),
    }
    return [(name, {**base, **change}) for name, change in changes.items()]


def test_the_one_pass_test_never_accepts_what_the_full_pass_refuses(gen):
    accepted = refused = 0
    for name, args in _mutations(gen) * 2:  # twice: the second round has the activation names the first accepted
        fast = moe_module._plain_args_ok(*args.values())
        try:
            moe_module.check_moe_args(*list(args.values())[:6], False, args["gate_up_bias"], args["down_bias"])
            ok = True
        except InvalidArgumentError:
            ok = False
        assert ok or not fast, f"{name}: the one-pass test accepts what check_moe_args refuses"
        if name in ("base", "sparse", "mixed", "biases", "activation clamped") and ok:
            accepted += fast
        refused += not ok
    assert accepted >= 5 and refused >= 20  # the common cases take the cheap pass (second round), bad ones do not


def test_hare_moe_reports_a_bad_argument_as_the_full_pass_does(gen):
    args = dict(_mutations(gen))["gate_up odd rows"]
    with pytest.raises(InvalidArgumentError, match="w_gate_up: expected an even number of rows"):
        hare.moe(*args.values())


# ------------------------------------------------------------------------------------------- programs
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("det", [True, False])
def test_program_workspace_regions_are_disjoint_and_inside(device, sparse, det):
    x, ids, w, wgu, wd = _case(T=300 if det else 5, sparse=sparse)
    hg._programs.clear()
    hg.run_fused_moe(x, ids, w, wgu, wd, "silu", det, hg.LaunchConfig(gateup_splits=2) if not det else None)
    (prog,) = hg._programs.values()
    p = prog.plan
    sizes = {"layout": 4 * p.layout.total, "weights": 4 * p.rows, "h": 2 * p.workspace_elements,
             "partial": 4 * p.partial_elements, "acc": 4 * p.tokens * p.hidden if p.accumulates else 0}
    spans = sorted((prog.regions[r], prog.regions[r] + n) for r, n in sizes.items())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= prog.ws_bytes
    assert all(start % hg._ALIGN == 0 for start, _ in spans)


@pytest.mark.parametrize("fused", [False, True])
def test_a_program_is_reused_and_follows_each_calls_tensors(device, fused):
    """Same shapes and weights: one program, one pooled buffer; the second call's structs point at its own x, ids,
    weights and output (the pointers patched per call), and its workspace fields agree across launches (the
    unfused GEMMs and combine, or the fused decode kernel's three structs)."""
    x, ids, w, wgu, wd = _case(T=40, k=4)
    config = hg.LaunchConfig(fused_decode=fused)
    hg._programs.clear()
    hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True, config)
    device.launches.clear()
    x2, ids2, w2 = x.clone(), ids.clone(), w.clone()
    out2 = hg.run_fused_moe(x2, ids2, w2, wgu, wd, "silu", True, config)
    assert len(hg._programs) == 1 and len(next(iter(hg._programs.values())).pool) == 1
    lay = _layout_fields(device)
    assert (lay["topk_ids"], lay["weights_in"]) == (ids2.data_ptr(), w2.data_ptr())
    if fused:
        (name, *_, ps), = [launch for launch in device.launches if launch[0].startswith("hare_decode")]
        gate_up, down = (_fields(name, prm, plan.GEMM_PARAMS)[1] for prm in ps[-3:-1])
        combine = _fields(name, ps[-1], plan.DECODE_PARAMS)[1]
        assert down["b_src"] == combine["h"] == gate_up["out"]  # unsplit gate/up: h, which the down GEMM reads
    else:
        gemms = [_fields(n, ps[-1])[1] for n, *_, ps in device.launches if n.startswith("hare_")]
        gate_up = next(f for (n, *_), f in zip(device.launches, gemms) if n.startswith("hare_gateup"))
        combine = next(f for (n, *_), f in zip(device.launches, gemms) if n == "hare_combine")
    assert gate_up["b_src"] == x2.data_ptr()
    assert gate_up["topk_weights"] == lay["weights_out"] and gate_up["gather_index"] == lay["gather_index"]
    assert combine["out"] == out2.data_ptr()


@pytest.mark.parametrize("dtype,code", [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 2),
                                        (torch.float64, 3)])
@pytest.mark.parametrize("check_ids", [False, True])
def test_the_layout_converts_the_routing_weights_and_checks_ids_when_told(device, dtype, code, check_ids):
    x, ids, w, wgu, wd = _case(wdtype=dtype)
    hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True, check_ids=check_ids)
    f = _layout_fields(device)
    assert (f["weights_dtype"], f["check_ids"]) == (code, int(check_ids))
    assert (f["first_bad"], f["status"]) == (device.first_bad.data_ptr(), device.status_ptr)
    assert f["weights_in"] == w.data_ptr() and f["weights_out"] != w.data_ptr()


def test_hare_moe_passes_check_ids_to_the_kernels(device, monkeypatch):
    monkeypatch.setattr(moe_module, "_cached_backend", lambda *a: ("hopper", ""))
    x, ids, w, wgu, wd = _case()
    for check_ids in (True, False):
        device.launches.clear()
        hare.moe(x, ids, w, wgu, wd, check_ids=check_ids)
        assert _layout_fields(device)["check_ids"] == int(check_ids)
    bad = ids.clone()
    bad[3, 1] = 99  # not checked on the host on this path: the layout kernel would find it
    hare.moe(x, bad, w, wgu, wd)


def test_the_reference_path_still_checks_ids_on_the_host():
    x, ids, w, wgu, wd = _case()
    bad = ids.clone()
    bad[3, 1] = bad[3, 0]
    with pytest.raises(InvalidArgumentError, match="token 3 is routed to the same expert twice"):
        hare.moe(x.float(), bad, w, wgu.float(), wd.float())


# ------------------------------------------------------------------------------------------- the error record
def _record(device, code, token=5, slot=1, value=40, other=-1, E=8, T=12, k=2, errors=1, seq=None):
    """Write the status words as layout_record_bad_id does."""
    from hare.gpu import _launch as L

    st, reported = device.status, device.status[L.STATUS_REPORTED]
    for i, v in ((L.STATUS_CODE, code), (L.STATUS_TOKEN, token), (L.STATUS_SLOT, slot), (L.STATUS_VALUE, value),
                 (L.STATUS_OTHER_SLOT, other), (L.STATUS_EXPERTS, E), (L.STATUS_TOKENS, T), (L.STATUS_TOP_K, k),
                 (L.STATUS_SEQ, reported if seq is None else seq)):
        st[i] = v
    st[L.STATUS_ERRORS] = reported + errors


def test_a_bad_id_is_raised_at_the_next_call_naming_token_slot_value_and_range(device):
    x, ids, w, wgu, wd = _case()
    hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True, check_ids=True)
    _record(device, 1, token=5, slot=1, value=40)
    n = len(device.launches)
    with pytest.raises(InvalidArgumentError, match=re.escape("token 5, slot 1: expert id 40 is not in [0, 8)")):
        hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True)
    assert len(device.launches) == n  # refused before any launch
    hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True)  # raised once: the next call runs
    _record(device, 2, token=7, slot=2, value=3, other=0, errors=3, k=4)
    with pytest.raises(InvalidArgumentError, match=r"token 7 is routed to expert 3 twice \(slots 0 and 2\).*"
                                                   r"its output is NaN; 2 later call\(s\) had bad ids too"):
        hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True)
    _record(device, 1, seq=-1, errors=2)  # a record from before the last report: no details, the count only
    with pytest.raises(InvalidArgumentError, match="2 earlier hare.moe call"):
        hg.run_fused_moe(x, ids, w, wgu, wd, "silu", True)


def test_check_errors_raises_the_pending_record_once(device, monkeypatch):
    launch = sys.modules["hare.gpu._launch"]
    monkeypatch.setattr(launch, "loaded", lambda d: device)
    dev = torch.device("cuda", 0)
    hg.check_errors(dev, synchronize=False)  # nothing pending
    _record(device, 1, value=-3)
    with pytest.raises(InvalidArgumentError, match=re.escape("expert id -3 is not in [0, 8)")):
        hg.check_errors(dev, synchronize=False)
    hg.check_errors(dev, synchronize=False)
    monkeypatch.setattr(launch, "loaded", lambda d: None)
    hg.check_errors(dev, synchronize=False)  # no kernel ran on that device


def test_the_status_words_match_layout_cuh(device):
    from hare.gpu import _launch as L

    text = (ROOT / "hare/gpu/csrc/layout.cuh").read_text()
    enum = re.search(r"enum StatusWord \{(.*?)\};", text, re.S).group(1)
    words = dict(re.findall(r"kStatus(\w+) = (\d+)", enum))
    ours = {n.removeprefix("STATUS_").replace("_", "").lower(): getattr(L, n) for n in dir(L)
            if n.startswith("STATUS_") and n != "STATUS_WORDS"}
    assert {k.lower(): int(v) for k, v in words.items()} == ours
    assert max(ours.values()) < L.STATUS_WORDS
    codes = dict(re.findall(r"kId(\w+) = (\d+)", text))
    assert (int(codes["OutOfRange"]), int(codes["Repeated"])) == (L.ID_OUT_OF_RANGE, L.ID_REPEATED)
    fields = [f for _, f, _ in plan.LAYOUT_PARAMS.fields]
    assert fields.index("status") < fields.index("ids_is_64")  # pointers first: no interior padding


CUDA_H = Path("/usr/local/cuda/include/cuda.h")


@pytest.mark.skipif(shutil.which("gcc") is None or not CUDA_H.exists(), reason="needs gcc and cuda.h")
def test_the_ctypes_launch_structs_match_cuda_h(device, tmp_path):
    import ctypes

    from hare.gpu import _launch as L

    src = tmp_path / "layout.c"
    src.write_text("""#include <cuda.h>
#include <stdio.h>
#include <stddef.h>
int main() {
  printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, blockDimX),
         offsetof(CUlaunchConfig, sharedMemBytes), offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs),
         offsetof(CUlaunchConfig, numAttrs), sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),
         offsetof(CUlaunchAttribute, value.programmaticStreamSerializationAllowed),
         (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);
}
""")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{CUDA_H.parent}", str(src), "-o", str(exe)], check=True)
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    C, A = L.LaunchConfig, L.LaunchAttribute
    ours = [ctypes.sizeof(C), C.blockDimX.offset, C.sharedMemBytes.offset, C.hStream.offset, C.attrs.offset,
            C.numAttrs.offset, ctypes.sizeof(A), A.value.offset, A.value.offset, L.PROGRAMMATIC_STREAM_SERIALIZATION]
    assert got == ours


def test_eager_host_time_per_call(device, monkeypatch):
    """The host path of hare.moe at H=2048, F=768, E=32, k=4, T=64 without the driver's own cost (the fake launches
    nothing): printed for notes/decode_overhead.md; bounded loosely against pathologies."""
    monkeypatch.setattr(moe_module, "_cached_backend", lambda *a: ("hopper", ""))
    monkeypatch.setattr(device, "run", lambda prog, stream, buf: None)  # no decoding: the host path alone
    x, ids, w, wgu, wd = _case(T=64, H=2048, F=768, E=32, k=4, wdtype=torch.bfloat16)
    run = lambda: hare.moe(x, ids, w, wgu, wd, check_ids=True)  # noqa: E731
    for _ in range(50):
        run()
    n, t0 = 2000, time.perf_counter()
    for _ in range(n):
        run()
    us = (time.perf_counter() - t0) / n * 1e6
    print(f"hare.moe host path, fake driver: {us:.1f} us/call")
    assert us < 500
