"""The packed pruned pass (``_THRESHOLDS_ASM``, ``_PAIR_ASM``, ``_ODD_PAIR_ASM``: inline PTX that only a
GPU runs, and ``_quotient``'s division without a divide) checked on the CPU: the PTX text executed with
numpy, instruction by instruction, and the kernel's own ``_quotient`` under Triton's interpreter (whose
FMA rounds once, as the GPU's does; the same test runs it compiled on a GPU).

The GPU tests compare the compiled kernel with the reference; these pin the same arithmetic here:
each threshold word is the fp16 threshold in both halves, the decision copies are the round-to-odd
copies wherever a decision depends on them, the quotient is the correctly rounded ``|w| / s2``, and
each pair's squared errors equal the reference rule's (fp32 decisions on ``u``, ``fl(Q * fl(v * s2))``,
the error squared) bit for bit, at every code, for ``u`` at, next to and between the decision
thresholds (both tie rules).
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from nvfp4_qat.format import E2M1_MIDPOINTS, E2M1_VALUES, fp8_code_values
from nvfp4_qat.kernels import _interpret
from nvfp4_qat.kernels import _sweep_kernels as K
from nvfp4_qat.kernels._sweep_kernels import _U_CAP, _quotient  # noqa: F401 (the kernel's names)
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


def bf16_halves(word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two bf16 values of each uint32 word, as float32 (exact): (low half, high half)."""
    w = np.asarray(word, np.uint32)
    return (w << 16).view(np.float32), (w & 0xFFFF0000).astype(np.uint32).view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint32 < 2**16), rounded to nearest even; NaN -> 0x7fff (canonical)."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32)
    return np.where(np.isnan(x), np.uint32(0x7FFF), r)


def _bf16x2(op: str, *words):
    # A packed bf16 instruction, half by half: computed in float64 and converted to bf16, which must
    # be exact (every use here is: 0/1 decisions, small multiples of 0.5, maxima of bf16 values), or
    # the emulation would round twice; `set` writes 1.0 / 0.0, `max.NaN` a NaN if either is NaN.
    out = []
    for half in (0, 1):
        x = [bf16_halves(w)[half].astype(np.float64) for w in words]
        with np.errstate(invalid="ignore"):
            if op.startswith("set"):
                r = ((x[0] >= x[1]) if ".ge." in op else (x[0] > x[1])).astype(np.float64)
            elif op.startswith("add"):
                r = x[0] + x[1]
            elif op.startswith("fma"):
                r = x[0] * x[1] + x[2]
            else:
                r = np.where(np.isnan(x[0]) | np.isnan(x[1]), np.nan, np.maximum(x[0], x[1]))
        bits = bf16_bits(r.astype(np.float32))
        back = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        ok = np.isnan(r) | (back == r)
        assert ok.all(), f"{op}: an inexact bf16 result, which this emulator does not round correctly"
        out.append(bits)
    return out[0] | (out[1] << 16)


def _f32(x) -> np.ndarray:
    # An f32 operand: float32 values, or a .b32 word moved into an f32 register (its bits).
    x = np.asarray(x)
    return x.view(np.float32) if x.dtype == np.uint32 else x.astype(np.float32)


def _operand(regs: dict, a: str):
    # A register or an immediate word (hex or decimal).
    return np.uint32(int(a, 16)) if a.startswith("0x") else (np.uint32(int(a)) if a.isdigit() else regs[a])


def _f16_rz_bits(x: np.ndarray) -> np.ndarray:
    # fp32 (>= 0) to fp16 bits, rounded toward zero: round to nearest, then one step down where that
    # rounded up (for values above fp16's range: 65504, not inf).
    r = np.asarray(x, np.float32).astype(np.float16)
    bits = r.view(np.uint16).copy()
    bits[r.astype(np.float32) > x] -= 1
    return bits


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
        elif op == "cvt.rz.f16x2.f32":  # the first source to the upper half
            hi, lo = (_f16_rz_bits(regs[r]).astype(np.uint32) for r in args[1:])
            regs[args[0]] = lo | (hi << 16)
        elif op == "setp.neu.f32":  # not equal, or unordered
            regs[args[0]] = ~(np.float32(regs[args[1]]) == np.float32(regs[args[2]]))
        elif op == "selp.b32":
            regs[args[0]] = np.where(regs[args[3]], _operand(regs, args[1]), _operand(regs, args[2])).astype(
                np.uint32
            )
        elif op == "or.b32":
            regs[args[0]] = (_operand(regs, args[1]) | _operand(regs, args[2])).astype(np.uint32)
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
        elif op in (
            "set.ge.bf16x2.bf16x2",
            "set.gt.bf16x2.bf16x2",
            "add.rn.bf16x2",
            "fma.rn.bf16x2",
            "max.NaN.bf16x2",
        ):
            regs[args[0]] = _bf16x2(op, *(_operand(regs, a) for a in args[1:]))
        elif op == "and.b32":
            regs[args[0]] = (_operand(regs, args[1]) & _operand(regs, args[2])).astype(np.uint32)
        elif op == "add.u32":
            regs[args[0]] = (_operand(regs, args[1]).astype(np.uint64) + _operand(regs, args[2])).astype(
                np.uint32
            )
        elif op == "prmt.b32":  # default mode: byte k of the result is byte selector[k] of (b, a)
            a, b = (_operand(regs, r).astype(np.uint64) for r in args[1:3])
            both, sel = a | (b << 32), int(args[3], 16)
            assert sel & 0x8888 == 0, "prmt's sign-replicate mode is not emulated"
            out = sum(((both >> (8 * ((sel >> (4 * k)) & 7))) & 0xFF) << (8 * k) for k in range(4))
            regs[args[0]] = np.asarray(out, np.uint64).astype(np.uint32)
        elif op == "shl.b32":
            regs[args[0]] = (_operand(regs, args[1]).astype(np.uint64) << int(args[2])).astype(np.uint32)
        elif op in ("mul.rn.f32", "sub.rn.f32"):
            f = np.multiply if op.startswith("mul") else np.subtract
            regs[args[0]] = f(_f32(regs[args[1]]), _f32(regs[args[2]])).astype(np.float32)
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


def _quotient_fn(a_ptr, out_ptr, s2_ptr, n, BLOCK: tl.constexpr):
    # The pruned pass's own _quotient (and its y and cap, as _decision_copies makes them).
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s2 = tl.full([BLOCK], 0.0, tl.float32) + tl.load(s2_ptr)
    y = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), s2)
    q = _quotient(tl.load(a_ptr + i, mask=i < n, other=0.0), -s2, y, s2 * _U_CAP)
    tl.store(out_ptr + i, q, mask=i < n)


def quotient(a: np.ndarray, s2: np.float32, device: str = "cpu") -> np.ndarray:
    """``_sweep_kernels._quotient`` of ``a``: compiled on CUDA, else under Triton's interpreter
    (whose ``tl.fma`` rounds once, as the GPU's does)."""
    if device == "cuda":
        kernel = triton.jit(_quotient_fn)
    else:  # resolve _quotient to its interpreted copy, as the launcher does for the kernels
        ns = dict(_interpret._namespace(K.__name__))
        kernel = InterpretedFunction(types.FunctionType(_quotient_fn.__code__, ns, "_quotient_fn"))
    x = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)
    out = torch.empty_like(x)
    block = 1 << 20 if device == "cpu" else 1024
    with np.errstate(over="ignore", invalid="ignore"):  # the cap is inf for s2 above ~2**116
        kernel[(triton.cdiv(x.numel(), block),)](
            x, out, torch.tensor([s2], device=device), x.numel(), BLOCK=block
        )
    return out.cpu().numpy()


def odd_pairs(a: np.ndarray, s2: np.float32) -> np.ndarray:
    """The packed pass's decision words: ``_ODD_PAIR_ASM`` of the quotients of element pairs."""
    u = quotient(a, s2)
    return run_ptx(K._ODD_PAIR_ASM.value, 1, [u[0::2], u[1::2]])[0]


def mismatches(pair_asm: str, s2: float, n: int, prologue: str = "packed") -> tuple[int, int]:
    """(elements whose squared error differs from the reference's, elements checked) for ``n`` probe
    values of u at every code, through ``pair_asm``, with the decision copies made as the packed
    pass makes them (``prologue="packed"``: _quotient and _ODD_PAIR_ASM) or as the interpreter's
    path does (``"divide"``: a division and _odd_f16)."""
    _, probes = decision_probe_values()
    probes = probes[torch.isfinite(probes) & (probes < 1e6)]
    probes = probes[torch.randperm(probes.numel(), generator=torch.Generator().manual_seed(1))[:n]]
    s2 = np.float32(s2)
    a = (probes.numpy() * s2).astype(np.float32)  # |w| near each probe times s2
    u = torch.from_numpy(a).div(torch.tensor(s2))  # u = fl(|w| / s2), what the reference decides on
    if prologue == "packed":
        pairs = odd_pairs(a, s2)
    else:
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


@pytest.mark.parametrize("prologue", ["packed", "divide"])
@pytest.mark.parametrize("s2", [1.0, 2.0**-7, 0.012345679, 3.3e-20, 2.0**-90])
def test_pair_asm_equals_the_reference_squared_errors_at_every_code(s2, prologue):
    bad, checked = mismatches(K._PAIR_ASM.value, s2, 60_000, prologue)
    assert checked == 126 * 60_000
    assert bad == 0, f"{bad} of {checked} squared errors differ from the reference"


def test_odd_pair_asm_is_the_round_to_odd_copy_where_decisions_need_it():
    # Against _odd_f16 (tested against fp32 decisions in test_sweep_triton.py): equal bits from
    # 2**-14 to 32768; below, an fp16 value below 2**-14 (fails every threshold, >= 2**-11, as 0
    # does); above, a value above every threshold (<= 2240).
    _, u = decision_probe_values()
    u = u[: u.numel() // 2 * 2]
    lo, hi = _halves(run_ptx(K._ODD_PAIR_ASM.value, 1, [u[0::2].numpy(), u[1::2].numpy()])[0])
    got = np.empty(u.numel(), np.float16)
    got[0::2], got[1::2] = lo, hi
    want = odd_copy(u).numpy()
    mid = ((u >= 2.0**-14) & (u <= 32768)).numpy()
    assert mid.sum() > 100_000
    assert np.array_equal(got[mid].view(np.uint16), want[mid].view(np.uint16))
    below, above = (u < 2.0**-14).numpy(), (u > 32768).numpy()
    assert below.sum() > 1000 and above.sum() > 10
    assert (got[below].astype(np.float32) < 2.0**-14).all() and (got[above].astype(np.float32) >= 32768).all()


def quotient_cases() -> list[np.float32]:
    gen = np.random.default_rng(3)
    exps = gen.uniform(-90, 115, 120)
    mant = gen.integers(0, 2**23, 120)
    random = [np.float32(np.ldexp(1.0 + m / 2**23, int(e))) for e, m in zip(exps, mant, strict=True)]
    edges = [2.0**-90, np.nextafter(np.float32(2.0**-90), np.float32(1)), 1.0, 1.5, 2.0 - 2.0**-23,
             0.012345679, 3.3e-20, 3.4e38 / 2688, 1.0 / 2688]  # fmt: skip
    return [np.float32(v) for v in edges] + random


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quotient_is_the_correctly_rounded_division(device):
    # For u from 2**-12 (below, every decision fails either way) up to the cap: the quotient's bits
    # are fl(|w| / s2), over s2 from 2**-90 to the largest, with |w| whose u sit at and around every
    # decision threshold, at fp16 grid points and across the range; above the cap, exactly the cap.
    # (The second correction is there for Markstein's theorem, which proves the result for every
    # input: one correction alone was also exact on every random pair tried.)
    _, probes = decision_probe_values()
    probes = probes[torch.isfinite(probes)].numpy()
    gen = np.random.default_rng(4)
    checked = 0
    for s2 in quotient_cases():
        a = (probes * s2).astype(np.float32)
        bits = a.view(np.int32)[:, None] + np.arange(-2, 3, dtype=np.int32)  # and its neighbours
        a = np.concatenate([bits.reshape(-1).view(np.float32), gen.random(20_000, np.float32) * s2 * 8])
        a = a[np.isfinite(a) & (a >= 0)]
        with np.errstate(over="ignore"):
            want = a / s2
        got = quotient(a, s2, device)
        exact = (want >= 2.0**-12) & (want <= K._U_CAP.value)
        assert np.array_equal(got[exact].view(np.int32), want[exact].view(np.int32)), s2
        assert (got[want > K._U_CAP.value] == K._U_CAP.value).all(), s2
        assert (got[want < 2.0**-12] < 2.0**-11).all(), s2
        checked += int(exact.sum())
    assert checked > 30_000_000


def test_the_quotient_check_can_fail():
    # The product fl(|w| * fl(1 / s2)) alone, without the corrections, differs from the division in
    # many cases (8.8 % here).
    s2 = np.float32(0.012345679)
    a = (np.random.default_rng(5).random(1_000_000, np.float32) * s2 * 100).astype(np.float32)
    product = (a * (np.float32(1) / s2)).astype(np.float32)
    assert np.array_equal(quotient(a, s2), a / s2)
    assert (product != a / s2).sum() > 50_000


def test_the_check_can_fail():
    # Weight 2 instead of 4 for the last threshold (magnitude 4 where it should be 6), or the
    # decision copies' halves swapped: both are caught.
    wrong_step = K._PAIR_ASM.value.replace("0x44004400", "0x40004000")
    swapped = K._PAIR_ASM.value.replace("$2, m0", "$3, m0").replace("$3, m1", "$2, m1")
    for asm in (wrong_step, swapped):
        assert asm != K._PAIR_ASM.value
        bad, _ = mismatches(asm, 0.012345679, 4_000)
        assert bad > 1000
