"""Memory safety of the kernels: the seeded fuzzer, the bw-sweep sequence that faulted (issue 18), and kernels fed
indices they must not trust (a corrupt block_idx, out-of-range ids with check_ids=False), in release and in the
checked debug build (HARE_DEBUG=1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hare

from . import fuzz
from .moe_cases import reference, rel_err

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_fuzzer_seeded():
    seed, n = int(os.environ.get("HARE_FUZZ_SEED", "2026")), int(os.environ.get("HARE_FUZZ_CASES", "200"))
    summary = fuzz.run(seed, n)
    print(f"fuzz seed {seed}: {summary['cases']} cases, worst rel err {summary['worst_rel_err']:.2e}, "
          f"{summary['seconds']:.0f} s")
    assert summary["cases"] == n


def test_bw_sweep_under_do_bench_cudagraph():
    """The issue-18 sequence: Mixtral-8x7B experts pruned at each bw, each timed by triton's do_bench_cudagraph (its
    own side stream) and freed before the next; every case's output also checked against float32."""
    triton = pytest.importorskip("triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    H, F, E, k, T = 4096, 14336, 8, 2, 16
    wgu = (torch.randn(E, 2 * F, H, device="cuda", generator=gen) / H ** 0.5).bfloat16()
    wd = (torch.randn(E, H, F, device="cuda", generator=gen) / F ** 0.5).bfloat16()
    x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
    w, ids = torch.randn(T, E, device="cuda", generator=gen).softmax(-1).topk(k, dim=-1)
    for bn, bm in ((1, 1), (1, 2)):
        for bw in (16, 32, 64):
            g, d = hare.sparsify(wgu, bn=bn, bm=bm, bw=bw), hare.sparsify(wd, bn=bn, bm=bm, bw=bw)
            triton.testing.do_bench_cudagraph(lambda: hare.moe(x, ids, w, g, d, check_ids=False), rep=2)
            out = hare.moe(x, ids, w, g, d)
            assert rel_err(out, reference(x, ids, w, g.to_dense(), d.to_dense())) < 1e-2, (bn, bm, bw)
            del g, d


_UNTRUSTED = r"""
import sys, torch, hare, hare.gpu as hg
torch.manual_seed(0)
E, H, F, T, k = 6, 704, 256, 300, 2
wgu = (torch.randn(E, 2 * F, H, device="cuda") * H ** -0.5).bfloat16()
wd = (torch.randn(E, H, F, device="cuda") * F ** -0.5).bfloat16()
g, d = hare.sparsify(wgu, bn=1, bm=2, bw=32), hare.sparsify(wd, bn=1, bm=2, bw=16)
x = torch.randn(T, H, device="cuda").bfloat16()
w, ids = torch.randn(T, E, device="cuda").softmax(-1).topk(k, dim=-1)
if sys.argv[1] == "block_idx":  # what a weight read before it was written may hold: any int32
    for t in (g.block_idx, d.block_idx):
        t.random_(-2 ** 31, 2 ** 31 - 1)
else:
    ids[::3, 0] = 10 ** 9
    ids[1::3, 1] = -5
for det in (True, False):
    out = hg.fused_moe(x, ids, w, g, d, deterministic=det) if sys.argv[1] == "block_idx" else \
        hare.moe(x, ids, w, g, d, deterministic=det, check_ids=False)
    torch.cuda.synchronize()
    assert out.shape == (T, H)
print("NO_FAULT")
"""


@pytest.mark.parametrize("untrusted", ["block_idx", "topk_ids"])
def test_untrusted_indices_cannot_fault(untrusted):
    """Release kernels clamp every caller-provided index before it becomes an address (wrong numbers, no illegal
    access); the debug build stops at the first one with a message naming it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HARE_DEBUG", None)
    run = lambda e: subprocess.run([sys.executable, "-c", _UNTRUSTED, untrusted], env=e, capture_output=True,  # noqa: E731
                                   text=True, timeout=300)
    release = run(env)
    assert release.returncode == 0 and "NO_FAULT" in release.stdout, release.stdout + release.stderr
    debug = run({**env, "HARE_DEBUG": "1"})
    assert debug.returncode != 0 and "NO_FAULT" not in debug.stdout
    assert "hare device check failed" in debug.stdout and untrusted in debug.stdout, debug.stdout[-2000:]
