"""A deliberately naive, scalar, pure-Python statement of the NVFP4 definition for cross-tests.

Nothing here imports nvfp4_qat: fp32 arithmetic is emulated by rounding exact float64 results to
float32 (double rounding is innocuous for +, -, *, / because 53 >= 2*24 + 2), the E2M1 rounding is
decided on exact rationals, and the FP8 table is built from the E4M3 bit layout.
"""

from __future__ import annotations

import struct
from fractions import Fraction

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def f32(a: float) -> float:
    """Round a Python float to the nearest float32 (ties to even)."""
    return struct.unpack("f", struct.pack("f", a))[0]


def fp8_e4m3_values() -> list[float]:
    """The 126 positive finite E4M3 values from the bit layout (bias 7, no infinities)."""
    out = []
    for bits in range(1, 127):
        exp, man = bits >> 3, bits & 7
        out.append(man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return out


FP8 = [0.0] + fp8_e4m3_values()  # index == bit pattern


def fp8_round(r: float) -> float:
    """Round a non-negative value to E4M3: nearest, ties to the even bit pattern, saturate 448."""
    if r >= 448.0:
        return 448.0
    best = min(range(len(FP8)), key=lambda i: (abs(Fraction(r) - Fraction(FP8[i])), i % 2, i))
    return FP8[best]


def e2m1_round(ratio: Fraction) -> float:
    """Nearest E2M1 magnitude to an exact non-negative ratio, ties to the even index, max 6."""
    return min(range(8), key=lambda i: (abs(ratio - Fraction(E2M1[i])), i % 2))


def code(block_amax: float, s2: float) -> float:
    if s2 == 0.0:
        return 0.0
    return fp8_round(f32(f32(block_amax / 6.0) / s2))


def quantize_element(x: float, e: float, s2: float) -> float:
    """fp32 result of the definition for one element at FP8 code value e."""
    if e == 0.0 or s2 == 0.0:
        return 0.0 if x >= 0 else -0.0
    u = f32(abs(x) / s2)
    q = E2M1[e2m1_round(Fraction(u) / Fraction(e))]
    mag = f32(q * f32(e * s2))
    return mag if x >= 0 else -mag


def fake_quantize(xs: list[float], block_amax: list[float], global_amax: float, bs: int = 16) -> list[float]:
    s2 = f32(global_amax / 2688.0)
    out = []
    for i, x in enumerate(xs):
        out.append(quantize_element(x, code(block_amax[i // bs], s2), s2))
    return out


def tree_sum(vals: list[float]) -> float:
    while len(vals) > 1:
        vals = [f32(vals[i] + vals[i + 1]) for i in range(0, len(vals), 2)]
    return vals[0]


def block_loss(block: list[float], v: float, s2: float) -> float:
    sq = []
    for x in block:
        d = f32(abs(x) - abs(quantize_element(x, v, s2)))
        sq.append(f32(d * d))
    return tree_sum(sq)


def sweep(xs: list[float], global_amax: float, bs: int = 16) -> tuple[list[float], list[int]]:
    """(block_amax, winning index) per block, first minimum wins."""
    s2 = f32(global_amax / 2688.0)
    values = fp8_e4m3_values()
    amaxes, winners = [], []
    for b in range(0, len(xs), bs):
        block = xs[b : b + bs]
        losses = [block_loss(block, v, s2) for v in values]
        k = min(range(len(values)), key=lambda i: (losses[i], i))
        winners.append(k)
        amaxes.append(f32(f32(values[k] / 448.0) * global_amax))
    return amaxes, winners
