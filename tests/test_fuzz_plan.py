"""CPU test of the GPU fuzzer's plan (tests/gpu/fuzz.py): the default seed's cases are reproducible and cover what
the fuzzer promises (every ratio x bw on both projections, every routing, execution and combine mode, 0 to 5000
tokens, the odd shapes, every fused gated unit with and without biases, a Block N:M gate/up at ffn % 128 = 64)."""

from hare.blocknm import BLOCK_WIDTHS, DENSITIES
from tests.gpu import fuzz


def test_default_seed_is_reproducible_and_covers_the_space():
    cases = fuzz.draw_cases(2026, 200)
    assert cases == fuzz.draw_cases(2026, 200)
    formats = {c.down for c in cases} | {c.gate_up for c in cases}
    assert {(bn, bm, bw) for bn, bm in DENSITIES.values() for bw in BLOCK_WIDTHS} | {None} <= formats
    assert {c.routing for c in cases} == set(fuzz.ROUTINGS)
    assert {c.mode for c in cases} == set(fuzz.MODES)
    assert {c.deterministic for c in cases} == {True, False}
    assert {c.public_api for c in cases} == {True, False}
    assert {c.garbage for c in cases} == {"bytes", "nan"}
    assert {(c.activation, c.biased) for c in cases} == {(a, b) for a in fuzz.UNITS for b in (True, False)}
    assert any(c.gate_up is not None and c.F % 128 == 64 for c in cases)
    assert min(c.T for c in cases) == 0 and max(c.T for c in cases) == 5000
    assert {(c.H, c.F, c.E, c.k) for c in cases} == set(fuzz.MODEL_SHAPES) | set(fuzz.ODD_SHAPES)


def test_cases_respect_the_kernels_contract():
    for c in fuzz.draw_cases(3, 500) + fuzz.draw_cases(7, 50, small=True, max_tokens=300, modes=("eager",)):
        assert c.H % 64 == 0 and c.F % 64 == 0 and c.k <= c.E
        for fmt, inp in ((c.gate_up, c.H), (c.down, c.F)):
            if fmt is not None:
                assert inp % fmt[2] == 0
    small = fuzz.draw_cases(7, 50, small=True, max_tokens=300, modes=("eager",), garbage=False)
    assert all(c.T <= 300 and c.mode == "eager" and c.garbage == "none" for c in small)
    assert {(c.H, c.F, c.E, c.k) for c in small} <= set(fuzz.ODD_SHAPES)
