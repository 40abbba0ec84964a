"""Small fused_moe + layout cases, dense and Block N:M, for compute-sanitizer (run by scripts/device_run.sh)."""

import torch

import hare
import hare.gpu as hg
from hare.gpu import ops
from tests.gpu.moe_cases import make_routing, make_weights, make_x, reference, rel_err

torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
for bn, (T, H, F, E, k) in zip(ops.BLOCK_NS, [(3, 320, 192, 8, 2), (37, 256, 128, 6, 3), (150, 320, 192, 4, 2),
                                             (300, 256, 256, 3, 2)]):
    ops.choose_block_n = lambda R, E, bn=bn: bn
    wgu, wd = make_weights(E, H, F, "cuda")
    x = make_x(T, H, "cuda")
    ids, w = make_routing(T, E, k, "cuda", skew=1.0)
    for det in (True, False):
        out = hg.fused_moe(x, ids, w, wgu, wd, deterministic=det)
        torch.cuda.synchronize()
        err = rel_err(out, reference(x, ids, w, wgu, wd))
        print(f"sanitize case bn={bn} T={T} det={det}: rel err {err:.2e}")
        assert err < 1e-2
# K-split decode path (gate/up fp32 partials + glu combine, down splits)
ops.choose_block_n = lambda R, E: 16
wgu, wd = make_weights(16, 1024, 512, "cuda")
x = make_x(2, 1024, "cuda")
ids, w = make_routing(2, 16, 2, "cuda")
assert ops.gateup_splits(4, 16, 16, 512, 1024 // 64, 132) > 1
for det in (True, False):
    out = hg.fused_moe(x, ids, w, wgu, wd, deterministic=det)
    torch.cuda.synchronize()
    err = rel_err(out, reference(x, ids, w, wgu, wd))
    print(f"sanitize split case det={det}: rel err {err:.2e}")
    assert err < 1e-2
# Block N:M: a partial last window and an odd kept count (H = 704 at 1:5, bw 16), a partial last panel of the
# down projection (H % 128 = 64), every token tile, and a K-split decode
for bn, (T, bnm, bw) in zip(ops.BLOCK_NS, [(3, (1, 5), 16), (37, (1, 2), 32), (150, (1, 1), 64), (300, (1, 10), 16)]):
    ops.choose_block_n = lambda R, E, bn=bn: bn
    wgu, wd = make_weights(6, 704, 256, "cuda")
    sgu, sd = (hare.sparsify(t, bn=bnm[0], bm=bnm[1], bw=bw) for t in (wgu, wd))
    x = make_x(T, 704, "cuda")
    ids, w = make_routing(T, 6, 2, "cuda", skew=1.0)
    for det in (True, False):
        out = hg.fused_moe(x, ids, w, sgu, sd, deterministic=det)
        torch.cuda.synchronize()
        err = rel_err(out, reference(x, ids, w, sgu.to_dense(), sd.to_dense()))
        print(f"sanitize sparse case bn={bn} T={T} {bnm} bw={bw} det={det}: rel err {err:.2e}")
        assert err < 1e-2
print("SANITIZE_CASE_OK")
