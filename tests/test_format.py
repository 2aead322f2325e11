"""NVFP4 numerics (nvfp4_qat.format) against the naive scalar definition in tests/naive.py."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
from nvfp4_qat import fake_quantize_nvfp4, fp8_scale_candidates
from nvfp4_qat.format import (
    E2M1_MIDPOINTS,
    E2M1_VALUES,
    block_codes,
    e2m1_magnitude,
    fp8_code_values,
    global_scale,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODES = naive.fp8_e4m3_values()


def t32(v):
    return torch.tensor(v, dtype=torch.float32)


# --- the candidate set ---------------------------------------------------------------------------


def test_candidates_count_order_ends():
    c = fp8_scale_candidates()
    assert c.shape == (126,) and c.dtype == torch.float32
    assert bool((c[1:] > c[:-1]).all())
    assert c[0].item() == naive.f32(2.0**-9 / 448)
    assert c[-1].item() == 1.0


def test_candidates_match_e4m3_bit_layout():
    assert fp8_code_values().tolist() == CODES
    expected = [naive.f32(v / 448.0) for v in CODES]
    assert fp8_scale_candidates().tolist() == expected


def test_candidates_device_argument():
    assert fp8_scale_candidates("meta").device.type == "meta"


# --- the E2M1 rounding table ---------------------------------------------------------------------


def test_e2m1_table_constants():
    assert E2M1_VALUES == naive.E2M1
    mids = [m for m, _ in E2M1_MIDPOINTS]
    assert mids == [(a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:], strict=False)]


@pytest.mark.parametrize("e", [1.0, 2.0**-9, 7 * 2.0**-9, 0.875, 1.125, 26.0, 448.0], ids=str)
def test_e2m1_every_midpoint_and_neighbours(e):
    """Walk every E2M1 value and midpoint times e, and one fp32 ulp either side."""
    points = []
    for mid, _ in E2M1_MIDPOINTS:
        p = mid * e
        points += [p, math.nextafter(p, 0.0), math.nextafter(p, math.inf)]
    for v in E2M1_VALUES:
        points.append(v * e)
    points += [0.0, 7 * e, 100 * e]
    u = torch.tensor(points, dtype=torch.float64).to(torch.float32)  # nextafter in fp64 -> fp32
    got = e2m1_magnitude(u, t32(e))
    want = [naive.E2M1[naive.e2m1_round(Fraction(x) / Fraction(e))] for x in u.tolist()]
    assert got.tolist() == want


def test_e2m1_ties_go_to_even():
    e = t32(1.0)
    u = t32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_magnitude(u, e).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_magnitude(t32([6.0, 7.0, 1e30]), e).tolist() == [6.0, 6.0, 6.0]  # saturates


def test_e2m1_zero_code_gives_zero():
    assert e2m1_magnitude(t32([0.0, 1.0, 1e30]), t32(0.0)).tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=300, deadline=None)
@given(
    u=st.floats(min_value=0.0, max_value=1e4, width=32, allow_subnormal=True),
    k=st.integers(min_value=0, max_value=125),
)
def test_e2m1_property_matches_exact_rational_rounding(u, k):
    e = CODES[k]
    got = e2m1_magnitude(t32([u]), t32(e)).item()
    assert got == naive.E2M1[naive.e2m1_round(Fraction(u) / Fraction(e))]


# --- per-block FP8 codes -------------------------------------------------------------------------


def test_block_codes_round_to_nearest_even_and_saturate():
    s2 = t32(1.0 / 6.0 * 6.0)  # s2 = 1: the ratio is block_amax / 6
    ratios = []
    for a, b in zip(
        [0.0] + CODES, CODES, strict=False
    ):  # midpoints between consecutive codes, and neighbours
        m = (a + b) / 2
        ratios += [m, math.nextafter(m, 0.0), math.nextafter(m, math.inf), b]
    ratios += [447.0, 448.0, 464.0, 479.0, 480.0, 1e6, 2.0**-10, 2.0**-11]
    r32 = torch.tensor(ratios, dtype=torch.float64).to(torch.float32)
    block_amax = r32 * 6  # exact: the ratio is recovered by the division by 6
    got = block_codes(block_amax, s2)
    want = [naive.fp8_round(naive.f32(naive.f32(b / 6.0) / 1.0)) for b in block_amax.tolist()]
    assert got.tolist() == want


def test_block_codes_zero_global_scale_gives_zero():
    assert block_codes(t32([0.0, 1.0, 5.0]), t32(0.0)).tolist() == [0.0, 0.0, 0.0]


def test_round_trip_every_code_over_global_amax_range():
    """block_amax = candidate * global_amax selects exactly that code, for g in [1e-30, 1e30]."""
    c = fp8_scale_candidates()
    v = fp8_code_values()
    gs = torch.logspace(-30, 30, 1201, dtype=torch.float64).to(torch.float32)
    gs = torch.cat([gs, t32([1e-30, 1e30, 1.0, 3.0, 0.1, 2688.0, 448.0, 6.0])])
    for g in gs:
        s2 = global_scale(g)
        e = block_codes(c * g, s2)
        assert torch.equal(e, v), f"g={g.item()}: {(e != v).sum().item()} codes differ"
        assert torch.equal(e * s2, v * s2)


# --- fake quantization ---------------------------------------------------------------------------


def _naive_fq(x, block_amax, g):
    xs = x.float().flatten().tolist()
    out = naive.fake_quantize(xs, block_amax.flatten().tolist(), float(g))
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_quantize_matches_naive_definition(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 64, generator=gen) * torch.logspace(-3, 1, 6).unsqueeze(1)).to(dtype)
    g = x.float().abs().max()
    bmax = x.float().abs().reshape(6, 4, 16).amax(-1)
    bmax[0, 0] = g * 1e-5  # a block far below the tensor max: FP8-subnormal code
    bmax[1, 1] = 0.0  # zero scale: zero block
    bmax[2, 2] = g * 3  # saturates at 448
    out = fake_quantize_nvfp4(x, bmax, g)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, _naive_fq(x, bmax, g))
    assert torch.equal(out[1, 16:32], torch.zeros(16, dtype=dtype))


def test_fake_quantize_midpoints_exactly():
    """Elements placed exactly at midpoints * scale round half to even."""
    g = t32(2688.0)  # s2 = 1
    mids = torch.tensor([m for m, _ in E2M1_MIDPOINTS] + [6.0, 0.0, 0.5, 3.0], dtype=torch.float32)
    x = torch.cat([mids, -mids[:5]]).reshape(1, 16)
    out = fake_quantize_nvfp4(x, t32([[6.0]]), g)  # block code 1.0
    assert out.tolist()[0] == [
        0.0,
        1.0,
        1.0,
        2.0,
        2.0,
        4.0,
        4.0,
        6.0,
        0.0,
        0.5,
        3.0,
        -0.0,
        -1.0,
        -1.0,
        -2.0,
        -2.0,
    ]


def test_fake_quantize_grid_values_are_fixed_points():
    g = t32(6.0 * 448.0 * 0.125)  # s2 = 1/8
    block_amax = t32([[0.75 * 6.0]])  # code 0.75 / (1/8) = 6 -> block scale 0.75
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32) * 0.75
    out = fake_quantize_nvfp4(grid.reshape(1, 16), block_amax, g)
    assert torch.equal(out.reshape(-1), grid)


def test_fake_quantize_zero_global_amax_gives_zeros_not_nan():
    x = torch.zeros(2, 32)
    out = fake_quantize_nvfp4(x, torch.zeros(2, 2), t32(0.0))
    assert torch.equal(out, x) and not out.isnan().any()
    # stale nonzero block amax with a zero global amax still gives zeros, never NaN
    out = fake_quantize_nvfp4(torch.ones(1, 16), t32([[1.0]]), 0.0)
    assert torch.equal(out, torch.zeros(1, 16))


def test_fake_quantize_accepts_flat_block_amax_and_3d_input():
    x = torch.randn(2, 3, 32)
    g = x.abs().max()
    bmax = x.abs().reshape(2, 3, 2, 16).amax(-1)
    assert torch.equal(fake_quantize_nvfp4(x, bmax, g), fake_quantize_nvfp4(x, bmax.flatten(), g))
    assert torch.equal(fake_quantize_nvfp4(x, bmax, g), _naive_fq(x, bmax, g))


def test_fake_quantize_disagrees_with_textbook_only_at_midpoints():
    """The docstring's claim: deciding on u = |x|/s2 differs from rounding |x|/(e*s2) only when u
    lies within half an ulp of a midpoint times e."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16384, 16, generator=gen).bfloat16().float()  # bf16 values often sit on midpoints
    g = x.abs().max()
    bmax = x.abs().amax(-1)
    s2 = global_scale(g)
    e = block_codes(bmax, s2).unsqueeze(1)
    ours = e2m1_magnitude(x.abs() / s2, e)
    ratio = x.abs() / (e * s2)  # the textbook quotient, correctly rounded
    textbook = e2m1_magnitude(ratio, torch.ones_like(e))
    differ = ours != textbook
    assert differ.sum() > 0  # the case exists, so the loop below checks something
    for i, j in differ.nonzero().tolist():
        u = (x[i, j].abs() / s2).item()
        near = [abs(u - m * e[i, 0].item()) for m, _ in E2M1_MIDPOINTS]
        assert min(near) <= math.ulp(u) / 2 * 1.0000001, (i, j)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_fake_quantize_cuda_bit_identical_to_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1024, 4096, generator=gen) * 0.02).to(dtype)
    g = x.float().abs().max()
    bmax = x.float().abs().reshape(-1, 16).amax(-1) * torch.rand(x.numel() // 16, generator=gen)
    cpu = fake_quantize_nvfp4(x, bmax, g)
    gpu = fake_quantize_nvfp4(x.cuda(), bmax.cuda(), g.cuda()).cpu()
    assert torch.equal(cpu, gpu), f"{(cpu != gpu).sum().item()} elements differ"
    assert torch.equal(fp8_scale_candidates("cuda").cpu(), fp8_scale_candidates())


def _table_s2_values() -> list[float]:
    """s2 across the whole positive fp32 range: every binade's ends and random mantissas."""
    gen = torch.Generator().manual_seed(5)
    out = [2.0**-149, 2.0**-148 * 3, 2.0**-126, float(torch.finfo(torch.float32).max) / 2688]
    for exp in range(-149, 118, 3):
        mant = 1 + torch.rand(3, generator=gen)
        out += [float(torch.tensor(2.0**exp) * m) for m in mant]
    return [v for v in out if v > 0]


def test_decision_table_brackets_every_boundary():
    """For every FP8 byte and midpoint, the table's window around midpoint * e * s2 starts below the
    boundary and ends above it, so the first passing float is the exact threshold (monotonicity)."""
    from nvfp4_qat.format import _WINDOW, decision_table

    mids = torch.tensor([m for m, _ in E2M1_MIDPOINTS])
    ties_down = torch.tensor([t for _, t in E2M1_MIDPOINTS])
    e = torch.nan_to_num(torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float(), nan=0.0)
    for s2v in _table_s2_values():
        s2 = torch.tensor(s2v, dtype=torch.float32)
        table = decision_table(s2)
        assert table.shape == (128, 8) and table.dtype == torch.float32
        assert torch.equal(table[:, 7], e * s2)
        t = e[1:127, None] * mids  # the 126 real codes
        thr = table[1:127, :7]
        assert torch.isfinite(thr).all(), s2v

        def passes(a, t=t, s2=s2):
            u = a / s2
            return torch.where(ties_down, u > t, u >= t)

        below = (thr.view(torch.int32) - 1).clamp(min=0).view(torch.float32)
        assert passes(thr).all(), s2v
        assert not (passes(below) & (thr > 0)).any(), s2v
        # the bracket itself: the window's ends fail and pass
        guess = (t * s2).view(torch.int32)
        lo = (guess - _WINDOW).clamp(min=0).view(torch.float32)
        hi = (guess + _WINDOW).view(torch.float32)
        assert not passes(lo).any() and passes(hi).all(), s2v
        assert torch.isinf(table[0, :7]).all() and table[0, 7] == 0


@pytest.mark.parametrize("s2v", [2.0**-10, 0.3 / 2688, 1e-41, 3e30 / 2688])
def test_decision_table_reproduces_fake_quantize(s2v):
    """Thresholds on |x| + the scale column give fake_quantize_unchecked's bits, including x at every
    threshold and the float just below it."""
    from nvfp4_qat.format import block_code_bytes, decision_table, fake_quantize_unchecked, global_scale

    g = torch.tensor(s2v * 2688, dtype=torch.float32)
    s2 = global_scale(g)
    table = decision_table(s2)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(1, 127, (4000,), generator=gen, dtype=torch.uint8)
    cols = torch.randint(0, 7, (4000, 16), generator=gen)
    thr = table[codes.long()].gather(1, cols)
    nudge = torch.randint(-1, 2, (4000, 16), generator=gen, dtype=torch.int32)
    x = (thr.view(torch.int32) + nudge).clamp(min=0).view(torch.float32)
    x = torch.where(torch.rand(4000, 16, generator=gen) < 0.5, -x, x)
    block_amax = codes.view(torch.float8_e4m3fn).float() * s2 * 6  # selects exactly these codes
    assert torch.equal(block_code_bytes(block_amax, s2), codes)
    rows = table[codes.long()]
    q = torch.zeros(4000, 16)
    for k, v in enumerate(E2M1_VALUES[1:]):
        q = torch.where(x.abs() >= rows[:, k : k + 1], v, q)
    out = torch.copysign(q * rows[:, 7:8], x)
    assert torch.equal(out.view(torch.int32), fake_quantize_unchecked(x, block_amax, g).view(torch.int32))
