"""The packed pruned pass (``_THRESHOLDS_ASM``, ``_PAIR_ASM``: inline PTX that only a GPU runs) checked
on the CPU, by executing its PTX text with numpy, instruction by instruction.

The GPU tests compare the compiled kernel with the reference; these pin the same arithmetic here:
each threshold word is the fp16 threshold in both halves, and each pair's squared errors equal the
reference rule's (fp32 decisions on ``u``, ``fl(Q * fl(v * s2))``, the error squared) bit for bit, at
every code, for ``u`` at, next to and between the decision thresholds (both tie rules).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from nvfp4_qat.format import E2M1_MIDPOINTS, E2M1_VALUES, fp8_code_values
from nvfp4_qat.kernels import _sweep_kernels as K
from test_sweep_triton import decision_probe_values, odd_copy

VALUES = fp8_code_values().numpy()


def _halves(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = word.astype(np.uint32)
    return (w & 0xFFFF).astype(np.uint16).view(np.float16), (w >> 16).astype(np.uint16).view(np.float16)


def _word(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    lo = np.asarray(lo, np.float16).view(np.uint16).astype(np.uint32)
    return lo | (np.asarray(hi, np.float16).view(np.uint16).astype(np.uint32) << 16)


def _f16x2(op, *words):
    # A packed fp16 instruction, half by half. Every use here is exact (small integers, exact
    # products), so computing in fp32 and rounding once to fp16 is the instruction's result.
    lows, highs = zip(*(_halves(w) for w in words), strict=True)
    return _word(op(*(x.astype(np.float32) for x in lows)), op(*(x.astype(np.float32) for x in highs)))


def _operand(regs: dict, a: str):
    # A register or an immediate word.
    return np.uint32(int(a, 16)) if a.startswith("0x") else (np.uint32(0) if a == "0" else regs[a])


def run_ptx(asm: str, n_out: int, inputs: list) -> list:
    """Execute the PTX subset the packed pass uses: ``$0..`` are the ``n_out`` outputs (returned),
    then the inputs. Words (b32, f16x2) are uint32 arrays, b16 registers fp16 bits, f32 registers
    float32 arrays."""
    regs: dict[str, object] = {f"${i + n_out}": v for i, v in enumerate(inputs)}
    body = asm.strip()
    assert body.startswith("{") and body.endswith("}")
    for text in body[1:-1].split(";"):
        text = text.strip()
        if not text or text.startswith(".reg"):
            continue
        op, args = text.split(None, 1)
        args = [a.strip() for a in re.split(r",(?![^{]*})", args)]
        if op == "mov.b32":
            dst, src = args
            if dst.startswith("{"):  # unpack a word into two b16 registers
                lo, hi = (r.strip() for r in dst.strip("{}").split(","))
                w = _operand(regs, src).astype(np.uint32)
                regs[lo], regs[hi] = (w & 0xFFFF).astype(np.uint16), (w >> 16).astype(np.uint16)
            elif src.startswith("{"):  # pack two b16 registers
                lo, hi = (regs[r.strip()] for r in src.strip("{}").split(","))
                regs[dst] = lo.astype(np.uint32) | (hi.astype(np.uint32) << 16)
            else:
                regs[dst] = _operand(regs, src)
        elif op == "cvt.rn.f16.f32":
            regs[args[0]] = np.asarray(regs[args[1]], np.float32).astype(np.float16).view(np.uint16)
        elif op == "cvt.f32.f16":
            regs[args[0]] = regs[args[1]].view(np.float16).astype(np.float32)
        elif op in ("set.gt.f16x2.f16x2", "set.ge.f16x2.f16x2"):
            cmp = np.greater if ".gt." in op else np.greater_equal
            regs[args[0]] = _f16x2(
                lambda a, b, cmp=cmp: cmp(a, b).astype(np.float32),
                _operand(regs, args[1]),
                _operand(regs, args[2]),
            )
        elif op == "add.rn.f16x2":
            regs[args[0]] = _f16x2(np.add, _operand(regs, args[1]), _operand(regs, args[2]))
        elif op == "mul.rn.f16x2":
            regs[args[0]] = _f16x2(np.multiply, _operand(regs, args[1]), _operand(regs, args[2]))
        elif op == "fma.rn.f16x2":
            regs[args[0]] = _f16x2(
                lambda a, b, c: a * b + c,
                _operand(regs, args[1]),
                _operand(regs, args[2]),
                _operand(regs, args[3]),
            )
        elif op in ("mul.rn.f32", "sub.rn.f32"):
            f = np.multiply if op.startswith("mul") else np.subtract
            regs[args[0]] = f(np.float32(regs[args[1]]), np.float32(regs[args[2]])).astype(np.float32)
        else:
            raise AssertionError(f"instruction {op!r} is not emulated: extend run_ptx")
    return [regs[f"${i}"] for i in range(n_out)]


def test_threshold_words_are_the_fp16_thresholds_of_every_code():
    outs = run_ptx(K._THRESHOLDS_ASM.value, 7, [VALUES.astype(np.float32)])
    for (mid, _), word in zip(E2M1_MIDPOINTS, outs, strict=True):
        lo, hi = _halves(word)
        want = (VALUES * mid).astype(np.float32)
        assert np.array_equal(lo.astype(np.float32), want) and np.array_equal(hi.astype(np.float32), want)


def reference_sq_err(a: np.ndarray, u: np.ndarray, v: float, s2: np.float32) -> np.ndarray:
    """The reference rule in fp32: E2M1 decision of u against midpoint * v (ties by the format's
    flags), magnitude fl(Q * fl(v * s2)), the error squared."""
    n = np.zeros(u.shape, np.int64)
    for mid, ties_down in E2M1_MIDPOINTS:
        t = np.float32(mid) * np.float32(v)
        n += (u > t) if ties_down else (u >= t)
    sv = np.float32(v) * s2
    e = a - (np.asarray(E2M1_VALUES, np.float32)[n] * sv).astype(np.float32)
    return (e * e).astype(np.float32)


def mismatches(pair_asm: str, s2: float, n: int) -> tuple[int, int]:
    """(elements whose squared error differs from the reference's, elements checked) for ``n`` probe
    values of u at every code, through ``pair_asm``."""
    _, probes = decision_probe_values()
    probes = probes[torch.isfinite(probes) & (probes < 1e6)]
    probes = probes[torch.randperm(probes.numel(), generator=torch.Generator().manual_seed(1))[:n]]
    s2 = np.float32(s2)
    a = (probes.numpy() * s2).astype(np.float32)  # |w| near each probe times s2
    u = torch.from_numpy(a).div(torch.tensor(s2))  # u = fl(|w| / s2), as the kernel divides
    h = odd_copy(u).numpy().view(np.uint16).astype(np.uint32)  # the kernel's decision copy
    pairs = h[0::2] | (h[1::2] << 16)
    bad = checked = 0
    for v in VALUES:
        words = run_ptx(K._THRESHOLDS_ASM.value, 7, [np.full(pairs.shape, v, np.float32)])
        hsv = np.full(pairs.shape, np.float32(v) * s2 * np.float32(0.5), np.float32)
        e0, e1 = run_ptx(pair_asm, 2, [a[0::2], a[1::2], pairs, *words, hsv])
        got = np.empty_like(a)
        got[0::2], got[1::2] = e0, e1
        want = reference_sq_err(a, u.numpy(), v, s2)
        bad += int((got.view(np.uint32) != want.view(np.uint32)).sum())
        checked += a.size
    return bad, checked


@pytest.mark.parametrize("s2", [1.0, 2.0**-7, 0.012345679, 3.3e-20])
def test_pair_asm_equals_the_reference_squared_errors_at_every_code(s2):
    bad, checked = mismatches(K._PAIR_ASM.value, s2, 60_000)
    assert checked == 126 * 60_000
    assert bad == 0, f"{bad} of {checked} squared errors differ from the reference"


def test_the_check_can_fail():
    # Weight 2 instead of 4 for the last threshold (magnitude 4 where it should be 6), or the
    # decision copies' halves swapped: both are caught.
    wrong_step = K._PAIR_ASM.value.replace("0x44004400", "0x40004000")
    swapped = K._PAIR_ASM.value.replace("$2, m0", "$3, m0").replace("$3, m1", "$2, m1")
    for asm in (wrong_step, swapped):
        assert asm != K._PAIR_ASM.value
        bad, _ = mismatches(asm, 0.012345679, 4_000)
        assert bad > 1000
