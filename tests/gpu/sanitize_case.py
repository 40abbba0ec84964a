"""Small fused_moe + layout cases, dense and Block N:M, for compute-sanitizer (run by scripts/device_run.sh).
With --decode only the fused decode kernel's cases run (racecheck's, which is slow); with --gemv only the few-token
path's."""

import sys
from dataclasses import replace

import torch

import hare
import hare.gpu as hg
from hare.errors import InvalidArgumentError
from hare.gpu.plan import DECODE_TILE_NS, TILE_NS
from tests.gpu.moe_cases import make_routing, make_weights, make_x, reference, rel_err

torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)


def check(label, x, ids, w, w_gate_up, w_down, config, activation="silu", biases=(None, None)):
    """Both combine modes of fused_moe against the float32 reference on the dense equivalent of the weights."""
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in (w_gate_up, w_down)]
    # the fused decode kernel (where it takes the tile), the unfused kernels, the plan's choice with fast sums
    runs = ((True, True), (True, False), (False, None)) if (config.tile_n or 16) in DECODE_TILE_NS else \
        ((True, False), (False, None))
    for det, fused in runs:
        out = hg.fused_moe(x, ids, w, w_gate_up, w_down, activation, det, replace(config, fused_decode=fused),
                           *biases)
        torch.cuda.synchronize()
        err = rel_err(out, reference(x, ids, w, *dense, activation, *biases))
        print(f"sanitize {label} det={det} fused_decode={fused}: rel err {err:.2e}")
        assert err < 1e-2


if "--gemv" in sys.argv:  # the few-token path: dense, Block N:M (halves gate/up, bw 32 down), biases, a bad id
    E, H, F = 6, 320, 192
    wgu, wd = make_weights(E, H, F, "cuda")
    sparse = (hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True), hare.sparsify(wd, bn=1, bm=5, bw=32))
    biases = (torch.randn(E, 2 * F, device="cuda"), torch.randn(E, H, device="cuda"))
    for T, k, weights, activation, b in ((1, 2, (wgu, wd), "silu", (None, None)), (3, 4, sparse, "silu", biases),
                                         (5, 1, (sparse[0], wd), "gpt-oss:alpha=1.702,limit=0.75", biases)):
        x, (ids, w) = make_x(T, H, "cuda"), make_routing(T, E, k, "cuda")
        out = hg.fused_moe(x, ids, w, *weights, activation, config=hg.LaunchConfig(gemv=True), gate_up_bias=b[0],
                           down_bias=b[1], check_ids=True)
        torch.cuda.synchronize()
        dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in weights]
        err = rel_err(out, reference(x, ids, w, *dense, activation, *b))
        print(f"sanitize gemv T={T} k={k}: rel err {err:.2e}")
        assert err < 1e-2
    bad = torch.tensor([[0, 7]], device="cuda")
    out = hg.fused_moe(make_x(1, H, "cuda"), bad, torch.ones(1, 2, device="cuda"), wgu, wd,
                       config=hg.LaunchConfig(gemv=True), check_ids=True)
    try:
        hg.check_errors()
        raise AssertionError("a bad id was not reported")
    except InvalidArgumentError:
        assert torch.isnan(out).all()
    print("SANITIZE_CASE_OK")
    sys.exit(0)

if "--decode" in sys.argv:  # the fused decode kernel: dense split and unsplit, Block N:M, joint panels
    wgu, wd = make_weights(6, 320, 192, "cuda")
    for T, weights, config in (
            (3, (wgu, wd), hg.LaunchConfig(gateup_splits=2, down_splits=2)),
            (20, (wgu, wd), hg.LaunchConfig()),
            (5, (hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True), hare.sparsify(wd, bn=1, bm=5, bw=32)),
             hg.LaunchConfig(tile_n=32)),
            (4, (hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True, joint="halves"),
                 hare.sparsify(wd, bn=1, bm=5, bw=16, joint="adjacent")), hg.LaunchConfig(gateup_splits=2))):
        x, (ids, w) = make_x(T, 320, "cuda"), make_routing(T, 6, 2, "cuda")
        out = hg.fused_moe(x, ids, w, *weights, config=replace(config, fused_decode=True))
        torch.cuda.synchronize()
        dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in weights]
        err = rel_err(out, reference(x, ids, w, *dense))
        print(f"sanitize decode T={T}: rel err {err:.2e}")
        assert err < 1e-2
    print("SANITIZE_CASE_OK")
    sys.exit(0)

for bn, (T, H, F, E, k) in zip(TILE_NS, [(3, 320, 192, 8, 2), (37, 256, 128, 6, 3), (150, 320, 192, 4, 2),
                                        (300, 256, 256, 3, 2)]):
    check(f"case bn={bn} T={T}", make_x(T, H, "cuda"), *make_routing(T, E, k, "cuda", skew=1.0),
          *make_weights(E, H, F, "cuda"), hg.LaunchConfig(tile_n=bn))
# K-split decode path (gate/up fp32 partials + glu combine, down splits)
check("split case", make_x(2, 1024, "cuda"), *make_routing(2, 16, 2, "cuda"), *make_weights(16, 1024, 512, "cuda"),
      hg.LaunchConfig(tile_n=16, gateup_splits=4, down_splits=4))
# Block N:M: a partial last window and an odd kept count (H = 704 at 1:5, bw 16), a partial last panel of the
# down projection (H % 128 = 64), every token tile, and a K-split decode
for bn, (T, bnm, bw) in zip(TILE_NS, [(3, (1, 5), 16), (37, (1, 2), 32), (150, (1, 1), 64), (300, (1, 10), 16)]):
    sparse = [hare.sparsify(t, bn=bnm[0], bm=bnm[1], bw=bw) for t in make_weights(6, 704, 256, "cuda")]
    check(f"sparse case bn={bn} T={T} {bnm} bw={bw}", make_x(T, 704, "cuda"), *make_routing(T, 6, 2, "cuda", skew=1.0),
          *sparse, hg.LaunchConfig(tile_n=bn))
# biased GPT-OSS unit on Block N:M weights with ffn % 128 = 64 (gate/up in the halves layout), unsplit and split
for T, config in ((45, hg.LaunchConfig(tile_n=64)), (3, hg.LaunchConfig(tile_n=16, gateup_splits=3, down_splits=2))):
    wgu, wd = make_weights(6, 320, 192, "cuda")
    sparse = hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True), hare.sparsify(wd, bn=1, bm=5, bw=32)
    biases = torch.randn(6, 384, device="cuda"), torch.randn(6, 320, device="cuda")
    check(f"biased sparse gpt-oss T={T}", make_x(T, 320, "cuda"), *make_routing(T, 6, 2, "cuda", skew=1.0), *sparse,
          config, "gpt-oss:alpha=1.702,limit=0.75", biases)
# joint panels (one token tile for both boxes): gate/up paired as halves (ffn % 128 = 64, halves layout), down
# adjacent (H % 256 = 192: the last tile's second box past the last panel) and halves (H % 256 = 0)
for T, H, F, djoint, config in ((77, 704, 192, "adjacent", hg.LaunchConfig(tile_n=128)),
                                (5, 512, 256, "halves", hg.LaunchConfig(tile_n=16, gateup_splits=2, down_splits=2))):
    wgu, wd = make_weights(6, H, F, "cuda")
    sparse = (hare.sparsify(wgu, bn=1, bm=2, bw=16, halves=True, joint="halves"),
              hare.sparsify(wd, bn=1, bm=5, bw=16, joint=djoint))
    check(f"joint sparse T={T} down {djoint}", make_x(T, H, "cuda"), *make_routing(T, 6, 2, "cuda", skew=1.0), *sparse,
          config)
print("SANITIZE_CASE_OK")
