"""A seeded fuzzer of the Hopper MoE kernels: many random cases in one process, on memory that was left dirty.

Each case draws a shape (model shapes with fewer experts, and odd ones: hidden/ffn off the 128 tile, partial
Block N:M windows, an out size that is not a multiple of 128), dense or Block N:M weights for each projection (every
ratio x every bw; a Block N:M gate/up in the halves layout, so ffn % 128 = 64 runs sparse too; joint panels or
not: gate/up paired as halves, down as halves where hidden % 256 == 0, else adjacent), a gated unit
(SiLU, GELU, clamped SiLU, GPT-OSS's clamped SwiGLU, with limits low enough to clamp), expert biases or none, a
token count from 0 to 5000, a routing (uniform, skewed, every token on one expert, most experts
empty), an execution (eager, a CUDA graph captured on a side stream and replayed on new inputs, or do_bench-style:
eager warm-ups then a graph of several calls replayed repeatedly, on a fresh side stream) and the combine mode.
Before every case the allocator's cached memory is filled with garbage (random bytes or NaN patterns) and the
previous case's tensors are freed, so a kernel that reads anything this call did not write, or leaves part of its
output unwritten, fails the float32 reference check.

    python3 -m tests.gpu.fuzz --seed 2026 --cases 200            # what tests/gpu/test_fuzz.py runs
    compute-sanitizer --tool memcheck python3 -m tests.gpu.fuzz --seed 7 --cases 12 --small
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

import hare
import hare.gpu as hg
from hare.blocknm import BLOCK_WIDTHS, DENSITIES

from .moe_cases import reference, rel_err

RATIOS = sorted(DENSITIES.values())
# (hidden, ffn, experts, top-k): model shapes (experts cut so a case prunes in well under a second) and odd ones
MODEL_SHAPES = [(4096, 14336, 2, 2), (2048, 768, 16, 8), (2048, 1408, 12, 6), (2048, 1408, 10, 4)]
ODD_SHAPES = [
    (704, 384, 8, 2),   # H/16 = 44 blocks: partial last window at 1:5 and 1:10; H % 128 = 64 (partial down panel)
    (320, 192, 6, 3),   # ffn % 128 = 64: a Block N:M gate/up's last gate and up panels hold 64 rows
    (576, 256, 5, 1),   # top-1
    (192, 128, 3, 2),   # tiny: H % 128 = 64, one panel
    (1088, 640, 7, 2),  # H % 256 = 64: the down tile's second box past the last panel
]
TOKENS = [0, 1, 2, 3, 16, 17, 64, 127, 128, 129, 300, 777, 1000, 2048, 5000]
ROUTINGS = ("uniform", "skewed", "one-expert", "most-empty")
MODES = ("eager", "graph", "bench")
# limits of about one standard deviation of the projections (~N(0, 1) here), so the clamps act
UNITS = ("silu", "gelu", "clamped-silu:limit=0.75", "gpt-oss:alpha=1.702,limit=0.75")
TOL = 1e-2


@dataclass(frozen=True)
class Case:
    index: int
    H: int
    F: int
    E: int
    k: int
    T: int
    gate_up: tuple | None  # (bn, bm, bw) or None for dense
    down: tuple | None
    routing: str
    activation: str
    biased: bool  # random fp32 gate_up_bias and down_bias
    mode: str
    deterministic: bool
    public_api: bool  # hare.moe (validation, dispatch) instead of hare.gpu.fused_moe
    garbage: str  # "bytes", "nan" or "none"
    joint: bool = False  # Block N:M weights with joint panels (the one-token-tile kernels)

    def __str__(self) -> str:
        w = lambda c: "dense" if c is None else f"{c[0]}:{c[1]}/bw{c[2]}"  # noqa: E731
        return (f"#{self.index} H={self.H} F={self.F} E={self.E} k={self.k} T={self.T} gate_up={w(self.gate_up)} "
                f"down={w(self.down)} {self.routing} {self.activation}{' biased' if self.biased else ''} "
                f"{self.mode} det={self.deterministic} "
                f"{'hare.moe' if self.public_api else 'fused_moe'} garbage={self.garbage}"
                f"{' joint' if self.joint else ''}")


def draw_cases(seed: int, n: int, small: bool = False, modes=MODES, max_tokens: int = 5000,
               garbage: bool = True) -> list[Case]:
    """n cases from `seed` (the same list on every machine: Python's own generator)."""
    rng = random.Random(seed)
    shapes = ODD_SHAPES if small else MODEL_SHAPES + ODD_SHAPES * 2
    tokens = [t for t in TOKENS if t <= max_tokens]
    cases = []
    for i in range(n):
        H, F, E, k = rng.choice(shapes)
        T = rng.choice(tokens)
        if H * F * E > 2 ** 27 and T > 2048:  # the Mixtral-sized shape: keep its reference cheap
            T = 2048
        weight = lambda: None if rng.random() < 0.25 else (*rng.choice(RATIOS), rng.choice(BLOCK_WIDTHS))  # noqa: E731
        gate_up, down = weight(), weight()
        cases.append(Case(i, H, F, E, k, T, gate_up, down, rng.choice(ROUTINGS), rng.choice(UNITS),
                          rng.random() < 0.4, rng.choice(modes),
                          rng.random() < 0.7, rng.random() < 0.3,
                          rng.choice(("bytes", "nan")) if garbage else "none", rng.random() < 0.5))
    return cases


def dirty_allocator(kind: str, nbytes: int, gen: torch.Generator) -> None:
    """Leave `nbytes` of the caching allocator's free memory holding garbage: random bytes (stale indices, huge or
    negative) or 0xFF bytes (NaN in bf16 and float32)."""
    if kind == "none":
        return
    junk = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    if kind == "bytes":
        junk.random_(0, 256, generator=gen)
    else:
        junk.fill_(0xFF)
    del junk


def make_routing(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 (T, k), distinct per token; weights float32 (T, k)) for the case's routing."""
    T, E, k = case.T, case.E, case.k
    probs = torch.ones(E, device="cuda")
    if case.routing == "skewed":
        probs = torch.arange(1, E + 1, device="cuda", dtype=torch.float32) ** -1.5
    elif case.routing == "most-empty":  # only k + 1 experts (or all, when E is that small) receive tokens
        probs = torch.zeros(E, device="cuda")
        probs[torch.randperm(E, device="cuda", generator=gen)[: min(E, k + 1)]] = 1.0
    ids = torch.multinomial(probs.expand(max(T, 1), E), k, replacement=False, generator=gen)[:T]
    if case.routing == "one-expert":  # every token's first choice is expert 0; the others stay distinct
        ids[:, 0] = 0
        if k > 1 and T:
            ids[:, 1:] = torch.multinomial(torch.ones(E - 1, device="cuda").expand(T, E - 1), k - 1,
                                           replacement=False, generator=gen) + 1
    w = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), dim=-1)
    return ids, w


def _weights(case: Case, gen: torch.Generator):
    H, F, E = case.H, case.F, case.E
    wgu = (torch.randn(E, 2 * F, H, device="cuda", generator=gen) * H ** -0.5).to(torch.bfloat16)
    wd = (torch.randn(E, H, F, device="cuda", generator=gen) * F ** -0.5).to(torch.bfloat16)
    joint_down = "halves" if H % 256 == 0 else "adjacent"
    prune = lambda w, c, halves, joint: w if c is None else hare.sparsify(  # noqa: E731
        w, bn=c[0], bm=c[1], bw=c[2], halves=halves, joint=joint if case.joint else None)
    biases = (None, None)
    if case.biased:
        biases = tuple(torch.randn(E, n, device="cuda", generator=gen) * 0.5 for n in (2 * F, H))
    return prune(wgu, case.gate_up, True, "halves"), prune(wd, case.down, False, joint_down), biases


def _inputs(case: Case, gen: torch.Generator):
    x = torch.randn(case.T, case.H, device="cuda", generator=gen).to(torch.bfloat16)
    return (x, *make_routing(case, gen))


def run_case(case: Case, gen: torch.Generator) -> float:
    """Runs one case; returns the relative error of its (last) output against the float32 reference."""
    wgu, wd, (bgu, bd) = _weights(case, gen)
    dirty_allocator(case.garbage, 64 << 20, gen)

    def call(x, ids, w):
        if case.public_api:
            return hare.moe(x, ids, w, wgu, wd, case.activation, deterministic=case.deterministic, check_ids=False,
                            gate_up_bias=bgu, down_bias=bd)
        return hg.fused_moe(x, ids, w, wgu, wd, case.activation, deterministic=case.deterministic,
                            gate_up_bias=bgu, down_bias=bd)

    x, ids, w = _inputs(case, gen)
    if case.mode == "eager":
        out = call(x, ids, w)
    elif case.mode == "graph":  # captured on torch.cuda.graph's side stream, replayed on new inputs
        call(x, ids, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(x, ids, w)
        x2, ids2, w2 = _inputs(case, gen)
        x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
        out.fill_(float("nan"))
        dirty_allocator(case.garbage, 64 << 20, gen)
        graph.replay()
        del graph
    else:  # as triton.testing.do_bench_cudagraph: eager calls then an unrolled graph, all on a fresh side stream
        holder, side = [], torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # the inputs were made on this stream
        with torch.cuda.stream(side):
            for _ in range(2):
                call(x, ids, w)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(3):
                    holder[:] = [call(x, ids, w)]
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            del graph
        out = holder[0]
    torch.cuda.synchronize()
    if out.shape != (case.T, case.H) or out.dtype != torch.bfloat16:
        raise AssertionError(f"{case}: output {tuple(out.shape)} {out.dtype}")
    if case.T == 0:
        return 0.0
    if not bool(torch.isfinite(out).all()):
        raise AssertionError(f"{case}: non-finite output (rows left unwritten?)")
    dense = [t.to_dense() if isinstance(t, hare.BlockNM) else t for t in (wgu, wd)]
    err = rel_err(out, reference(x, ids, w, *dense, case.activation, bgu, bd))
    if not err < TOL:
        raise AssertionError(f"{case}: rel err {err:.3e}")
    return err


def run(seed: int, n: int, small: bool = False, modes=MODES, max_tokens: int = 5000, garbage: bool = True,
        verbose: bool = False) -> dict:
    """Runs the cases of (seed, n) in their drawn order; raises AssertionError naming the first failing case."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cases = draw_cases(seed, n, small, modes, max_tokens, garbage)
    t0, worst = time.perf_counter(), 0.0
    for case in cases:
        err = run_case(case, gen)
        worst = max(worst, err)
        if verbose:
            print(f"{case}: rel err {err:.2e}", flush=True)
    return {"seed": seed, "cases": len(cases), "worst_rel_err": worst, "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--small", action="store_true", help="odd small shapes only (for compute-sanitizer)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--max-tokens", type=int, default=5000)
    ap.add_argument("--no-garbage", action="store_true",
                    help="leave freed memory as it is (initcheck: run with PYTORCH_NO_CUDA_MEMORY_CACHING=1)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    summary = run(a.seed, a.cases, a.small, tuple(a.modes), a.max_tokens, not a.no_garbage, a.verbose)
    print(f"FUZZ_OK seed {summary['seed']}: {summary['cases']} cases, worst rel err {summary['worst_rel_err']:.2e}, "
          f"{summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
