"""What the kernel benchmarks share: the timers, the hardware ceilings measured in the run, the session every run
sets up first, the inputs (model-shaped experts, routed tokens, chunked Block N:M stacks) and the FLOP/byte
accounting. The baselines are in ``hare.bench.baselines``, the results writer in ``hare.bench.common``."""

from __future__ import annotations

import time

import torch

from ..blocknm import BlockNM, sparsify

ROUTINGS = ("uniform", "zipf")
ZIPF_S = 1.2
CHUNK_ELEMS = 1 << 28  # weight entries sparsified or densified at once: bounds the temporaries


# ------------------------------------------------------------------------------------------ timing
def event_ms(fn) -> float:
    """ms of one ``fn()`` on the current CUDA stream, between two events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median_ms(fn, device, warmup: int = 2, reps: int = 5) -> float:
    """Median time of ``fn()`` in ms after ``warmup`` calls: CUDA events on a GPU, the host clock elsewhere."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            times.append(event_ms(fn))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


class Timer:
    """CUDA-graph replay timing with the L2 cache flushed before each replay."""

    def __init__(self, device):
        self.flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)

    def time_graph(self, fn, budget_s: float = 0.25, max_reps: int = 30, min_reps: int = 3) -> float:
        """Median ms of CUDA-graph replays of fn() (warmed up and captured first), L2 flushed before each."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return self.time_replay(g.replay, budget_s, max_reps, min_reps)

    def time_replay(self, replay, budget_s: float = 0.25, max_reps: int = 30, min_reps: int = 3) -> float:
        """Median ms of replay() (a captured graph's), L2 flushed before each."""
        replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay()
        torch.cuda.synchronize()
        est = time.perf_counter() - t0
        reps = int(max(min_reps, min(max_reps, budget_s / max(est, 1e-6))))
        times = []
        for _ in range(reps):
            self.flush.zero_()
            times.append(event_ms(replay))
        times.sort()
        return times[len(times) // 2]


# ------------------------------------------------------------------------------------------ ceilings
def measure_ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written; best of a memcpy and an elementwise kernel, in a graph and eager),
    read bandwidth (a sum), and the bf16 matmul rate (8192^3), all measured here."""
    t = Timer(device)
    n = 1024 * 1024 * 1024 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 4
    times = [t.time_graph(lambda: dst.copy_(src), budget_s=0.1),
             t.time_graph(lambda: torch.mul(src, 1.0, out=dst), budget_s=0.1)]
    times += [event_ms(lambda: dst.copy_(src)) for _ in range(2)]
    copy_tbps = nbytes / (min(times) * 1e-3) / 1e12
    out = torch.empty((), device=device)
    read_ms = t.time_graph(lambda: torch.sum(src, dim=0, out=out), budget_s=0.1)
    read_tbps = src.numel() * 4 / (read_ms * 1e-3) / 1e12
    src = dst = None
    a = torch.randn(8192, 8192, device=device).to(torch.bfloat16)
    b = torch.randn(8192, 8192, device=device).to(torch.bfloat16)
    ms = t.time_graph(lambda: a @ b, budget_s=0.2)
    peak = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_tbps": copy_tbps, "read_tbps": read_tbps, "matmul_tflops": peak}


class BenchSession:
    """What every kernel benchmark run sets up first: the checked device, TF32 off, a seeded generator, the ceilings
    measured in this run, a timer, and the optional log file (``say`` writes a line to it)."""

    def __init__(self, device="cuda", seed: int = 0, log=None):
        import hare.gpu as hg

        self.dev = torch.device(device)
        ok, why = hg.availability(self.dev)
        if not ok:
            raise RuntimeError(f"hare.gpu is not available: {why}")
        torch.backends.cuda.matmul.allow_tf32 = False
        self.gen = torch.Generator(device=self.dev).manual_seed(seed)
        self._log = open(log, "w") if log else None
        self.ceil = measure_ceilings(self.dev)
        self.say(f"ceilings: {self.ceil}")
        self.timer = Timer(self.dev)

    def say(self, msg: str) -> None:
        if self._log:
            self._log.write(msg + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log:
            self._log.close()


# ------------------------------------------------------------------------------------------ inputs
def make_weights(E, H, F, device, gen=None):
    """Random bf16 experts scaled to unit-variance outputs: w_gate_up (E, 2F, H), w_down (E, H, F)."""
    wgu = (torch.randn(E, 2 * F, H, device=device, generator=gen) * H**-0.5).to(torch.bfloat16)
    wd = (torch.randn(E, H, F, device=device, generator=gen) * F**-0.5).to(torch.bfloat16)
    return wgu, wd


def make_case(T, H, E, k, routing, device, gen):
    """x (T, H) bf16 and its top-k routing over E experts: ``uniform``, or ``zipf`` (expert popularity ~ rank^-1.2,
    ranks shuffled); returns x, topk_ids, topk_weights (float32, softmax)."""
    x = torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16)
    if routing == "uniform":
        probs = torch.ones(E, device=device)
    else:
        probs = torch.arange(1, E + 1, device=device, dtype=torch.float32) ** (-ZIPF_S)
        probs = probs[torch.randperm(E, device=device, generator=gen)]
    ids = torch.multinomial(probs.expand(T, E), k, replacement=False, generator=gen)
    w = torch.softmax(torch.randn(T, k, device=device, generator=gen), dim=-1)
    return x, ids, w


def _experts_per_chunk(w) -> int:
    return max(1, CHUNK_ELEMS // (w.shape[-2] * w.shape[-1]))


def sparsify_experts(w: torch.Tensor, bn: int, bm: int, bw: int, **layout) -> BlockNM:
    """hare.sparsify of a stack of experts, a chunk of experts at a time (bounded temporaries), as one BlockNM;
    ``layout`` goes to hare.sparsify (``halves=True`` for a gate/up stack whose ffn is no multiple of 128)."""
    step = _experts_per_chunk(w)
    parts = [sparsify(w[a:a + step], bn=bn, bm=bm, bw=bw, **layout) for a in range(0, w.shape[0], step)]
    return BlockNM(*(torch.cat([getattr(p, f) for p in parts]) for f in ("values", "meta", "block_idx")),
                   shape=w.shape, **parts[0].params)


def densify(w: BlockNM) -> torch.Tensor:
    """BlockNM.to_dense of a stack, a chunk of experts at a time."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    step = _experts_per_chunk(out)
    for a in range(0, w.num_experts, step):
        b = min(a + step, w.num_experts)
        out[a:b] = w.select_experts(a, b).to_dense()
    return out


# ------------------------------------------------------------------------------------------ accounting
def moe_flops(rows, H, F) -> float:
    """Dense FLOPs of R routed rows: gate/up 4·R·H·F + down 2·R·H·F (a sparse kernel's dense equivalent)."""
    return 6.0 * rows * H * F


def traffic_bytes(expert_bytes, touched, T, H) -> float:
    """Fewest bytes a layer moves: the touched experts' weights (``expert_bytes`` each) + x + out (bf16)."""
    return touched * expert_bytes + 2.0 * T * H * 2


def weight_density(gu: BlockNM, dn: BlockNM) -> float:
    """Stored fraction of all entries of the two projections (each BlockNM.density, weighted by its size)."""
    sizes = [w.out_features * w.in_features for w in (gu, dn)]
    return (gu.density * sizes[0] + dn.density * sizes[1]) / sum(sizes)

