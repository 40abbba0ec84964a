"""The contract between the Block N:M storage and the sparse GPU kernel, checked on the CPU.

moe_gemm.cuh (SPARSE) reads, for MMA step j of a 128-row panel: 16 compressed values per row (values[:, 16j:16j+16],
zero past the end), one metadata word per lane (slot 2(l/4) + l%2 of the row's 16-row group: low half row g, high
half row g + 8, column half l%2), and token columns block_idx[panel][L / bw] * bw + L % bw for logical column L
(clamped to the last kept block past the end). Rebuilding W @ x from exactly those reads must give to_dense() @ x.
"""

import pytest
import torch

import hare
from hare.blocknm import PANEL


def kernel_view_matvec(w: hare.BlockNM, x: torch.Tensor) -> torch.Tensor:
    E, out, _ = w.shape
    kb, bw = w.kept_blocks, w.bw
    steps = w.meta.shape[-1] // 64
    vals = torch.nn.functional.pad(w.values.double(), (0, steps * 16 - w.values.shape[-1]))
    rows = torch.arange(out)
    g, h = rows % 8, (rows % 16) // 8
    y = torch.zeros(E, out, dtype=torch.float64)
    for e in range(E):
        for j in range(steps):
            for t0 in range(2):
                at = w.meta[e, rows // 16].long()  # (out, steps*64) bytes of each row's 16-row group
                off = j * 64 + (2 * g + t0) * 4
                word = sum(at.gather(1, (off + b)[:, None])[:, 0] << (8 * b) for b in range(4))
                half = (word >> (16 * h)) & 0xFFFF
                for i in range(4):
                    nib = (half >> (4 * i)) & 0xF
                    for n, pos in enumerate((nib & 3, nib >> 2)):
                        logical = j * 32 + 16 * t0 + 4 * i + pos
                        q = (logical // bw).clamp(max=kb - 1)
                        col = w.block_idx[e, rows // PANEL].long().gather(1, q[:, None])[:, 0] * bw + logical % bw
                        v = vals[e, rows, j * 16 + 8 * t0 + 2 * i + n]
                        y[e] += v * x[col].double()
    return y


@pytest.mark.parametrize("E,out,inp,bn,bm,bw", [
    (2, 40, 48, 1, 1, 16),     # out not a multiple of 16; 3 kept blocks: odd step count
    (1, 136, 352, 1, 5, 16),   # two panels, the second partial; a partial last window; tail padding
    (1, 64, 384, 1, 2, 64),    # 3 kept blocks of 64: 6 steps
    (1, 16, 320, 1, 10, 32),   # 1 kept block: one real step, one padding step
])
def test_the_kernels_reads_rebuild_the_dense_product(E, out, inp, bn, bm, bw):
    torch.manual_seed(0)
    w = hare.sparsify(torch.randn(E, out, inp), bn=bn, bm=bm, bw=bw, dtype=torch.float32)
    x = torch.randn(inp)
    want = w.to_dense().double() @ x.double()
    assert torch.allclose(kernel_view_matvec(w, x), want, rtol=0, atol=1e-10)
