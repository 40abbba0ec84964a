"""Issue 18's evidence (GPU): does a side stream see hare.sparsify's output before the stream that ran it wrote it?

Prunes Mixtral-8x7B down-projection experts at bw 16 then 32 and, right after each sparsify returns, clones
block_idx on a fresh side stream (as triton's do_bench_cudagraph would read it); after a sync it counts the entries
the side stream saw unwritten. At ab587fa (no sync at the end of sparsify): 43,123 of 57,344 at bw 32, 28,672 of
them out of range; since sparsify waits for its stream: 0 (notes/memory_safety.md).

    PYTHONPATH=. python3 scripts/stream_race_probe.py
"""
import torch

import hare

torch.manual_seed(0)
H, F, E = 4096, 14336, 8
wd = (torch.randn(E, H, F, device="cuda") / F ** 0.5).bfloat16()
junk = torch.randint(-2**31, 2**31 - 1, (64 << 20,), dtype=torch.int32, device="cuda")
del junk  # leave garbage in the allocator's cache
for bw in (16, 32):
    d = hare.sparsify(wd, bn=1, bm=2, bw=bw)
    with torch.cuda.stream(torch.cuda.Stream()):
        early = d.block_idx.clone()
    torch.cuda.synchronize()
    n_blocks = F // bw
    diff = int((early != d.block_idx).sum())
    oob = int(((early < 0) | (early >= n_blocks)).sum())
    print(f"bw {bw}: side stream saw {diff} of {early.numel()} block_idx entries unwritten, {oob} outside "
          f"[0, {n_blocks}); min {int(early.min())} max {int(early.max())}", flush=True)
    del d, early
