"""Triton kernels of the NVFP4 scale sweep: exhaustive, and exact pruned (two passes).

Each kernel returns, for every block of 16 consecutive elements, exactly what
:func:`nvfp4_qat._sweep_reference.sweep_reference` returns, bit for bit: the scores are the
reference's (``u = |w| / s2`` correctly rounded, the E2M1 decision on ``u`` against
``midpoint * v``, the dequantized magnitude ``fl(q * fl(v * s2))``, the 16 squared errors summed by
the same pairwise tree), candidates are visited in ascending order with a strict ``<`` (the first
minimum wins), and the output is ``candidates[best] * global_amax``. FMA contraction would change
those bits, so every launch passes ``enable_fp_fusion=False``.

Pruned sweep (``_sweep_pruned_kernel``): with ``k0`` the first code whose scale does not saturate
the block (``6 * v >= u_max``), it scores only the window ``[k0 - N_BELOW, k0 + 7]`` and proves
the rest cannot win:

* Above: for a non-saturating code ``v`` the FP4 grid at ``2v`` (below ``u_max``) is a subset of
  the grid at ``v``, and ``fl(2v * s2) = 2 * fl(v * s2)``, so every element's computed error at
  ``2v`` is >= its error at ``v`` (also for elements an ulp from a midpoint, where the float32
  decision and the float32 error could in principle disagree: an exhaustive check over every fp32
  mantissa of ``s2`` finds no such element, see ``tests/test_sweep_triton.py``), and the monotone
  tree sum follows; the smaller index wins ties. In the FP8 normal range ``v[k + 8] = 2 * v[k]``,
  so everything from ``k0 + 8`` up is dominated by a window code. A subnormal ``v[k0]`` (halving
  a candidate need not give a candidate) flags the block.
* Below: every code under ``k0`` saturates, and the max element alone contributes
  ``(m - 6 * s)^2``, which grows as ``s`` falls. Where that lower bound at ``start - 1`` does not
  strictly exceed the window's best loss yet (0.9% of the blocks of a random bf16 8192x4096 weight
  with N_BELOW = 3, 16% with 2), the tile scores up to N_EXTRA more codes downwards; blocks still
  unresolved are flagged (none of that weight's 2,097,152 with N_EXTRA = 2).

Flagged blocks (and every block when ``s2 < 2**-90``, where products may turn subnormal and the
pruned pass's division without a divide may round) are appended to a work list and swept
exhaustively by ``_sweep_worklist_kernel``: persistent on CUDA
(the count stays on the device, no host sync), each listed block copied LANES times with every copy
scanning a slice of the codes, so that a few flagged blocks do not wait for one thread to walk all
126 codes.

On CUDA the pruned pass scores a code with inline PTX (``_PAIR_ASM``: packed fp16 decisions summed
to the magnitude, no selects), and makes its decision copies without a divide (``_quotient``) and
two per instruction (``_ODD_PAIR_ASM``); Triton's interpreter cannot run assembly, so on the CPU it
divides and takes the select tree of ``_sq_err`` (the ``PACKED`` constexpr): the same decisions and
arithmetic, bit for bit, which ``tests/test_packed_pass.py`` checks by executing the PTX text with
numpy and ``_quotient`` itself under the interpreter (whose FMA rounds once).

On bf16 weights on sm_90 (``WORDS``) the pruned pass decides in x space instead: each code's seven
thresholds of ``format.decision_table`` (the least fp32 |w| whose quotient by s2 passes the decision),
rounded up to bf16, come from a per-tensor table (``_sweep_table_kernel``, one launch for many
tensors), and ``_WORDS_PAIR_ASM`` compares the weight's own bf16 pairs with them: no quotient and no
decision copies, the same decisions (a bf16 number passes a threshold exactly when it passes the
threshold rounded up to bf16), the same magnitudes fl(Q * fl(v * s2)) (the table's scale column).
``tests/test_bf16_sweep_pass.py`` checks the table against ``decision_table`` and the PTX against the
reference's squared errors.

CPU tensors run under Triton's interpreter: :func:`interpreted` rebuilds a kernel and its helpers
as interpreted functions from the same source, so the compiled CUDA kernels stay intact in the same
process. (That is also why no jitted library function such as ``tl.sum`` or ``tl.max`` is used:
an interpreted kernel cannot call one when triton was imported without ``TRITON_INTERPRET``.)
"""

from __future__ import annotations

import itertools
import struct

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from nvfp4_qat._validation import INFO_ALL_ZERO, INFO_BAD_GLOBAL_AMAX, INFO_NONFINITE_X, ZERO_U_BOUND
from nvfp4_qat.format import E2M1_MIDPOINTS, E2M1_VALUES, FP4_MAX, GLOBAL_SCALE_DIVISOR
from nvfp4_qat.kernels import _interpret
from nvfp4_qat.kernels.fake_quant import _bf16_halves, _bf16_max, bf16_decisions_ptx

# The E2M1 rule, imported from the format module (never restated): midpoint, ties-down flag and
# the magnitude reached by passing it, one triple per midpoint, ascending.
(_M1, _T1), (_M2, _T2), (_M3, _T3), (_M4, _T4), (_M5, _T5), (_M6, _T6), (_M7, _T7) = (
    (tl.constexpr(m), tl.constexpr(t)) for m, t in E2M1_MIDPOINTS
)
_Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7 = (tl.constexpr(q) for q in E2M1_VALUES[1:])
_D1, _D2, _D3, _D4, _D5, _D6, _D7 = (tl.constexpr(int(t)) for _, t in E2M1_MIDPOINTS)  # ties down, as 0/1
_QMAX = tl.constexpr(FP4_MAX)
_DIVISOR = tl.constexpr(GLOBAL_SCALE_DIVISOR)
# Below this s2, v * s2 or q * v * s2 can be subnormal and the pruning proof no longer holds (from
# 2**-100), and _quotient's remainder may round (below 2**-91): every block then goes to the
# exhaustive pass.
_TINY_S2 = tl.constexpr(2.0**-90)
# _quotient's cap on u (a power of two, so cap = fl(u_cap * s2) is exact): above every threshold.
_U_CAP = tl.constexpr(4096.0)
# Triton's own combine functions for tl.reduce: tl.sum / tl.max are jitted wrappers that an
# interpreted kernel cannot call, while the interpreter runs these as numpy reductions.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min

# (BLOCK_B, num_warps, register cap) of each kernel: fixed, not autotuned. Autotuning cost every process ~3 s of
# trial runs per weight shape with a warm Triton cache (and ~4 s of compiling per unrolled pruned
# config when cold), for configs within a few % of each other. Exhaustive, medians on an H200
# (8192x4096 bf16, `benchmarks/bench_sweep.py --configs`): B32w1 3.498, B64w2 3.416, B128w4 3.422,
# B256w8 3.456 ms. Pruned: one block per thread (BLOCK_B = 32 * num_warps; two per thread, B256w4,
# took 0.594 ms against 0.306 for B256w8 in session 7). With the packed pass (session 8, same run,
# through launch_sweep): B32w1 0.246, B64w2 0.241, B128w4 0.244, B256w8 0.259 ms. Smaller tiles score
# fewer codes: a tile scores an extra code below the window when any one of its blocks needs it
# (11.17 codes per block at B32, 11.31 at B64, 11.52 at B128 on a normal 512x4096 weight, counted
# exactly on CPU by benchmarks/count_sweep_candidates.py). Session 9's pass (64 registers per thread
# uncapped; 56 with the cap, no spills), three runs of 8192x4096 and two of the 224 Llama-3-8B weights
# (one H200 run): B64w2 0.232-0.234 ms / 48.88-49.16 ms, B64w2 capped at 56 registers 0.228-0.230 /
# 48.26-48.31, B32w1 0.230-0.231 / -, B32w1 capped 0.2284-0.2285 / 47.79-47.80, B128w4 capped
# 0.233-0.234 / 49.02-49.10, B256w8 0.243. With 2 or more warps per program the cap lets 36 warps
# share an SM instead of 32; with one, an SM holds 32 programs either way, so B32w1's small gain from
# it (0.2284 against 0.2295-0.2306 ms) is not occupancy, and uncapped B32w1 was not timed over the
# Llama set.
EXHAUSTIVE_CONFIG = triton.Config({"BLOCK_B": 32}, num_warps=1)
PRUNED_CONFIG = triton.Config({"BLOCK_B": 32}, num_warps=1, maxnreg=56)
#: The pruned pass's tile with its bf16 pass (WORDS): B32w1 without the register cap. Capped at 56
#: it spills (5 stores, 16 bytes of stack) and took 0.2328 ms on the 8192x4096 bf16 weight, against
#: 0.2247 uncapped (64 registers; one warp per program, so an SM holds 32 programs either way) and
#: 0.2275 for the pass without WORDS (H200, one run of `benchmarks/kernel_variants.py`).
PRUNED_WORDS_CONFIG = triton.Config({"BLOCK_B": 32}, num_warps=1)
#: Alternatives with the same results (tests pin each one; the benchmark times them).
EXHAUSTIVE_CONFIGS = [
    EXHAUSTIVE_CONFIG,
    triton.Config({"BLOCK_B": 64}, num_warps=2),
    triton.Config({"BLOCK_B": 128}, num_warps=4),
    triton.Config({"BLOCK_B": 256}, num_warps=8),
]
PRUNED_CONFIGS = [
    PRUNED_CONFIG,
    PRUNED_WORDS_CONFIG,
    triton.Config({"BLOCK_B": 256}, num_warps=8),
    triton.Config({"BLOCK_B": 128}, num_warps=4),
    triton.Config({"BLOCK_B": 64}, num_warps=2),
]
#: Tile of the second (work-list) pass: BLOCK_B blocks x LANES slices of the codes (B16 L8 0.464 ms
#: in total above, B32 L4 0.472, B32 L1 0.549). Not autotuned: its length is only known on the device.
WORKLIST_CONFIG = triton.Config({"BLOCK_B": 16, "LANES": 8}, num_warps=4)
#: Columns of the partials' row 2 that the tiles' max |x| is spread over (see ``_store_amax``).
AMAX_SLOTS = tl.constexpr(32)


def _f16x2(x: float) -> str:
    """``x`` (exact in fp16) in both halves of a 32-bit word, as a PTX immediate."""
    bits = struct.unpack("<H", struct.pack("<e", x))[0]
    return f"0x{bits << 16 | bits:08x}"


# The packed pruned pass (CUDA): two elements per instruction for the E2M1 decision and the
# magnitude, all on the FP arithmetic pipe. The select tree of _sq_err costs ~5 selects and 3.5
# packed compares per element-code, and selects and compares issue at half the rate of FP
# arithmetic on sm_80/90; here `set.f16x2` gives 1.0/0.0 per half, and their weighted sum is the
# magnitude in halves (2 * E2M1 value: integers 0..12, exact in fp16). Then, in fp32 per element,
# fl(q2 * fl(sv / 2)) is fl(Q * sv) bit for bit (the same real number, rounded once; sv / 2 is exact
# because sv >= 2**-99: v >= 2**-9, and s2 >= 2**-90 where the tiny-s2 flag does not send every
# block to the work list), and the error and its square as in _sq_err.
#: Per code: the 7 thresholds MID * v in fp16 (exact: <= 7 significant bits, in fp16's normal range),
#: each in both halves of a word. $0..$6 out, $7: v (fp32).
_THRESHOLDS_ASM = tl.constexpr(
    "{ .reg .b16 h; .reg .b32 v2, m; cvt.rn.f16.f32 h, $7; mov.b32 v2, {h, h}; "
    + "".join(
        f"mov.b32 m, {_f16x2(mid)}; mul.rn.f16x2 ${k}, v2, m; " for k, (mid, _) in enumerate(E2M1_MIDPOINTS)
    )
    + "}"
)
#: Per pair of elements and code: $0, $1 out, the squared errors (fp32); $2, $3: |w| (fp32); $4: the
#: pair's fp16 decision copies (_odd_f16_bits, element 2i in the low half); $5..$11: thresholds;
#: $12: fl(sv / 2). A midpoint that ties down compares with > (u must pass it), else >=.
_STEPS = [
    round(2 * (hi - lo)) for lo, hi in zip(E2M1_VALUES[:-1], E2M1_VALUES[1:], strict=True)
]  # 1,1,1,1,2,2,4
# The decisions of each run of equal steps are summed first (the first set straight into the run's
# register), then the runs are combined, lowest step first: 7 sets and 6 packed adds/FMAs per pair,
# against 7 and 7 when every decision was added to one running sum that started at 0.
_RUNS = [(step, [k for k, st in enumerate(_STEPS) if st == step]) for step in dict.fromkeys(_STEPS)]
if _RUNS[0][0] != 1 or any(b - a != 1 for _, ks in _RUNS for a, b in itertools.pairwise(ks)):
    raise RuntimeError(f"_PAIR_ASM assumes runs of equal steps starting with 1, got {_STEPS}")


def _run_sum(reg: str, ks: list[int]) -> str:
    # reg = the sum of the decisions (1.0 / 0.0 per half) at thresholds ks.
    cmp = [f"set.{'gt' if E2M1_MIDPOINTS[k][1] else 'ge'}.f16x2.f16x2" for k in ks]
    text = f"{cmp[0]} {reg}, $4, ${5 + ks[0]}; "
    for op, k in zip(cmp[1:], ks[1:], strict=True):
        text += f"{op} c, $4, ${5 + k}; add.rn.f16x2 {reg}, {reg}, c; "
    return text


_PAIR_ASM = tl.constexpr(
    "{ .reg .b32 q, r, c, w; .reg .b16 lo, hi; .reg .f32 m0, m1, e0, e1; "
    + _run_sum("q", _RUNS[0][1])
    + "".join(
        _run_sum("r", ks) + f"mov.b32 w, {_f16x2(step)}; fma.rn.f16x2 q, r, w, q; " for step, ks in _RUNS[1:]
    )
    + "mov.b32 {lo, hi}, q; cvt.f32.f16 m0, lo; cvt.f32.f16 m1, hi; "
    "mul.rn.f32 m0, m0, $12; mul.rn.f32 m1, m1, $12; sub.rn.f32 e0, $2, m0; sub.rn.f32 e1, $3, m1; "
    "mul.rn.f32 $0, e0, e0; mul.rn.f32 $1, e1, e1; }"
)


#: Two fp32 u >= 0 ($1: element 2i, $2: element 2i + 1) as their fp16 round-to-odd decision copies
#: (_odd_f16_bits) in one word, element 2i in the low half: both truncated by one cvt.rz (which also
#: keeps values above fp16's range finite, 65504), then each half's last bit set where truncating
#: lost something (the half, widened again, differs from u). Round to odd either way; below 2**-14
#: the copies are fp16 subnormals rather than _odd_f16_bits' 0, and fail every threshold as 0 does.
_ODD_PAIR_ASM = tl.constexpr(
    "{ .reg .b32 w, s; .reg .b16 l, h; .reg .f32 fl, fh; .reg .pred pl, ph; "
    "cvt.rz.f16x2.f32 w, $2, $1; mov.b32 {l, h}, w; cvt.f32.f16 fl, l; cvt.f32.f16 fh, h; "
    "setp.neu.f32 pl, fl, $1; setp.neu.f32 ph, fh, $2; "
    "selp.b32 s, 1, 0, pl; or.b32 w, w, s; selp.b32 s, 65536, 0, ph; or.b32 $0, w, s; }"
)


# The bf16 pass (WORDS: bf16 weights on sm_90). A bf16 |w| passes a decision exactly when it passes
# the x-space threshold of format.decision_table (the least fp32 a with fl(a / s2) past midpoint * v,
# ties included) rounded up to bf16, so each code's seven thresholds, made once per tensor by
# _sweep_table_kernel, decide two elements per `set` straight on the weight's bf16 pairs: no
# quotient u = |w| / s2 and no decision copies (the pruned pass's prologue: 445 -> 181 SASS
# instructions per block, sm_90; GPU time of the pruned kernels over the 224 Llama-3-8B weights
# 45.58 -> 41.75 ms on an H200). The E2M1 value Q is summed in bf16 (exact), and fl(Q * fl(v * s2))
# is the table's scale column times Q.
#: Per pair of elements and code: $0, $1 out, the squared errors (fp32); $2, $3: |w| (fp32); $4: the
#: pair's |w| as bf16x2 (element 2i in the low half); $5..$11: the code's threshold words; $12: the
#: code's scale fl(v * s2) (fp32).
_WORDS_PAIR_ASM = tl.constexpr(
    "{ .reg .b32 q, c, r, w, l, h; .reg .f32 fl, fh, m0, m1, e0, e1; "
    + bf16_decisions_ptx("q", "$4", 5)
    + "shl.b32 l, q, 16; and.b32 h, q, 0xffff0000; mov.b32 fl, l; mov.b32 fh, h; "
    "mul.rn.f32 m0, fl, $12; mul.rn.f32 m1, fh, $12; sub.rn.f32 e0, $2, m0; sub.rn.f32 e1, $3, m1; "
    "mul.rn.f32 $0, e0, e0; mul.rn.f32 $1, e1, e1; }"
)
#: Words per table row: the seven thresholds, then the scale's fp32 bits.
TABLE_ROW = tl.constexpr(8)


@triton.jit
def _odd_f16_bits(u):
    # u (fp32, >= 0) as fp16, truncated with a sticky last bit ("round to odd"). A round-to-odd
    # value compares with every number of fewer significant bits exactly as the original does
    # (equal only if u was exact; otherwise it lies strictly between the same two such numbers).
    # The decision thresholds midpoint * v have <= 7 significant bits (3 of the midpoint, 4 of the
    # FP8 code) and lie in [2**-11, 2240], inside fp16's normal range with 11 bits: so the E2M1
    # decision on this copy is the fp32 decision, bit for bit, and two elements fit one compare
    # (HSETP2; the CUDA pruned pass makes the same copies with _ODD_PAIR_ASM). u below 2**-14 (fp16
    # subnormals) fails every threshold and maps to 0; u above every threshold is clamped first
    # (the fp16 range ends at 65504). Where u is NaN (x NaN; the pruned pass maps NaN |x| to inf
    # first), the loss is NaN at every code whatever the decisions.
    uc = tl.minimum(u, 32768.0)
    bits = uc.to(tl.int32, bitcast=True)
    h = ((bits >> 13) - (112 << 10)) | ((bits & 0x1FFF) != 0).to(tl.int32)  # rebias 127 -> 15
    h = tl.where(uc < 0.00006103515625, 0, h)  # 2**-14
    return h  # int32, the fp16 bits: < 0x8000 for u >= 0 (sign clear)


@triton.jit
def _f16(h):
    # fp16 bits (int32, < 0x8000) as fp16 values.
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _odd_f16(u):
    return _f16(_odd_f16_bits(u))


@triton.jit
def _code_consts(v, s2, F16: tl.constexpr):
    # The 7 decision thresholds MID * v of code v (exact in fp32, and in fp16 with F16) and its
    # scale fl(v * s2): computed once per code (and block), used per element.
    t1 = v * _M1
    t2 = v * _M2
    t3 = v * _M3
    t4 = v * _M4
    t5 = v * _M5
    t6 = v * _M6
    t7 = v * _M7
    if F16:  # the pruned pass (per-block v): 0.385 -> 0.337 ms on an H200. Not for a v shared
        # by the tile (the exhaustive kernel): 3.49 -> 3.94 ms there at its best tile.
        t1 = t1.to(tl.float16)
        t2 = t2.to(tl.float16)
        t3 = t3.to(tl.float16)
        t4 = t4.to(tl.float16)
        t5 = t5.to(tl.float16)
        t6 = t6.to(tl.float16)
        t7 = t7.to(tl.float16)
    return t1, t2, t3, t4, t5, t6, t7, v * s2


@triton.jit
def _sq_err(a, u, t1, t2, t3, t4, t5, t6, t7, sv):
    # Squared error of elements |w| = a at one code: the one per-element rule of every kernel.
    # u: |w| / s2 (fp32, correctly rounded), or its fp16 copy _odd_f16(u) when t is fp16 (same
    # decisions); t1..t7, sv: _code_consts. Passing threshold tk lifts the magnitude to fl(Qk * sv);
    # at a tie it stays down when the format's flag T says so. (The products are made here, not
    # passed in: Triton 3.6 fails to compile the work-list kernel's loop when they are, "operand
    # does not dominate this use"; the compiler makes them once per code either way.) The decisions are monotone (u passing one
    # passes every lower one), so the magnitude is picked by a 3-level tree of selects rather than a
    # chain of 7 (fewer selects, and no 7-deep dependency: 0.42 -> 0.38 ms pruned, 3.96 -> 3.49
    # exhaustive on an 8192x4096 bf16 weight, H200). Written out: a jit call per decision is slow
    # in the interpreter.
    c1 = (u > t1) if _T1 else (u >= t1)
    c2 = (u > t2) if _T2 else (u >= t2)
    c3 = (u > t3) if _T3 else (u >= t3)
    c4 = (u > t4) if _T4 else (u >= t4)
    c5 = (u > t5) if _T5 else (u >= t5)
    c6 = (u > t6) if _T6 else (u >= t6)
    c7 = (u > t7) if _T7 else (u >= t7)
    low = tl.where(c2, tl.where(c3, _Q3 * sv, _Q2 * sv), tl.where(c1, _Q1 * sv, 0.0))
    high = tl.where(c6, tl.where(c7, _Q7 * sv, _Q6 * sv), tl.where(c5, _Q5 * sv, _Q4 * sv))
    e = a - tl.where(c4, high, low)
    return e * e


@triton.jit
def _block_loss(
    absw,  # [B, 16] fp32, |w|
    u,  # [B, 16]: u = |w| / s2 (fp32), or _odd_f16(u) with F16
    v,  # [B, 1] or scalar fp32, FP8 code value
    s2,  # scalar fp32
    B: tl.constexpr,
    F16: tl.constexpr,
):
    # Squared error of each block at code v, summed as the reference does. -> [B] fp32
    t1, t2, t3, t4, t5, t6, t7, sv = _code_consts(v, s2, F16)
    sq = _sq_err(absw, u, t1, t2, t3, t4, t5, t6, t7, sv)
    # Pairwise tree over adjacent pairs (16 -> 8 -> 4 -> 2 -> 1), as the reference sums: element
    # 8a+4b+2c+d, summed over d, then c, b, a. Each step adds exactly two numbers, so the result
    # does not depend on how a reduction is laid out over threads (the last one uses shuffles).
    r = tl.reshape(sq, [B, 2, 2, 2, 2])
    r = tl.reduce(r, 4, _SUM)
    r = tl.reduce(r, 3, _SUM)
    r = tl.reduce(r, 2, _SUM)
    return tl.reduce(r, 1, _SUM)


@triton.jit
def _thresholds_f16x2(v):
    # The 7 thresholds of code v ([B] fp32) for _PAIR_ASM. -> 7 [B] int32
    return tl.inline_asm_elementwise(_THRESHOLDS_ASM, "=r,=r,=r,=r,=r,=r,=r,f", [v], dtype=(tl.int32,) * 7,
                                     is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _sq_err_pair(a0, a1, h, t, hsv):
    # Squared errors of two elements at one code (_PAIR_ASM). -> ([B] fp32, [B] fp32)
    return tl.inline_asm_elementwise(
        _PAIR_ASM, "=f,=f,f,f,r,r,r,r,r,r,r,r,f", [a0, a1, h, t[0], t[1], t[2], t[3], t[4], t[5], t[6], hsv],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _block_loss16(a, h, v, s2, PACKED: tl.constexpr):
    # _block_loss for blocks held as 16 [B] vectors (one thread per block, the pruned pass): a is the
    # tuple of the 16 elements' |w|; h holds their fp16 decision copies, with PACKED as 8 [B] int32
    # pairs (_PAIR_ASM: CUDA), else as 16 fp16 vectors (_sq_err: the interpreter, which cannot run
    # inline assembly). The same decisions, magnitudes and pairwise tree either way. -> [B]
    if PACKED:
        t = _thresholds_f16x2(v)
        hsv = (v * s2) * 0.5
        e0, e1 = _sq_err_pair(a[0], a[1], h[0], t, hsv)
        e2, e3 = _sq_err_pair(a[2], a[3], h[1], t, hsv)
        e4, e5 = _sq_err_pair(a[4], a[5], h[2], t, hsv)
        e6, e7 = _sq_err_pair(a[6], a[7], h[3], t, hsv)
        e8, e9 = _sq_err_pair(a[8], a[9], h[4], t, hsv)
        e10, e11 = _sq_err_pair(a[10], a[11], h[5], t, hsv)
        e12, e13 = _sq_err_pair(a[12], a[13], h[6], t, hsv)
        e14, e15 = _sq_err_pair(a[14], a[15], h[7], t, hsv)
    else:
        t1, t2, t3, t4, t5, t6, t7, sv = _code_consts(v, s2, True)
        e0 = _sq_err(a[0], h[0], t1, t2, t3, t4, t5, t6, t7, sv)
        e1 = _sq_err(a[1], h[1], t1, t2, t3, t4, t5, t6, t7, sv)
        e2 = _sq_err(a[2], h[2], t1, t2, t3, t4, t5, t6, t7, sv)
        e3 = _sq_err(a[3], h[3], t1, t2, t3, t4, t5, t6, t7, sv)
        e4 = _sq_err(a[4], h[4], t1, t2, t3, t4, t5, t6, t7, sv)
        e5 = _sq_err(a[5], h[5], t1, t2, t3, t4, t5, t6, t7, sv)
        e6 = _sq_err(a[6], h[6], t1, t2, t3, t4, t5, t6, t7, sv)
        e7 = _sq_err(a[7], h[7], t1, t2, t3, t4, t5, t6, t7, sv)
        e8 = _sq_err(a[8], h[8], t1, t2, t3, t4, t5, t6, t7, sv)
        e9 = _sq_err(a[9], h[9], t1, t2, t3, t4, t5, t6, t7, sv)
        e10 = _sq_err(a[10], h[10], t1, t2, t3, t4, t5, t6, t7, sv)
        e11 = _sq_err(a[11], h[11], t1, t2, t3, t4, t5, t6, t7, sv)
        e12 = _sq_err(a[12], h[12], t1, t2, t3, t4, t5, t6, t7, sv)
        e13 = _sq_err(a[13], h[13], t1, t2, t3, t4, t5, t6, t7, sv)
        e14 = _sq_err(a[14], h[14], t1, t2, t3, t4, t5, t6, t7, sv)
        e15 = _sq_err(a[15], h[15], t1, t2, t3, t4, t5, t6, t7, sv)
    return _tree16(e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15)


@triton.jit
def _tree16(e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15):
    # The reference's pairwise tree over a block's 16 squared errors.
    low = ((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7))
    return low + (((e8 + e9) + (e10 + e11)) + ((e12 + e13) + (e14 + e15)))


@triton.jit
def _sq_err_words(a0, a1, w, row):
    # Squared errors of two elements at the code of table row `row` ([B] pointers), _WORDS_PAIR_ASM.
    return tl.inline_asm_elementwise(
        _WORDS_PAIR_ASM, "=f,=f,f,f,r,r,r,r,r,r,r,r,f",
        [a0, a1, w, tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
         tl.load(row + 5), tl.load(row + 6), tl.load(row + 7).to(tl.float32, bitcast=True)],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _block_loss_words(a, w, row):
    # _block_loss16 of the WORDS pass: a the 16 |w| (fp32), w their 8 bf16x2 words, row the code's
    # table row ([B] int32 pointers). -> [B]
    e0, e1 = _sq_err_words(a[0], a[1], w[0], row)
    e2, e3 = _sq_err_words(a[2], a[3], w[1], row)
    e4, e5 = _sq_err_words(a[4], a[5], w[2], row)
    e6, e7 = _sq_err_words(a[6], a[7], w[3], row)
    e8, e9 = _sq_err_words(a[8], a[9], w[4], row)
    e10, e11 = _sq_err_words(a[10], a[11], w[5], row)
    e12, e13 = _sq_err_words(a[12], a[13], w[6], row)
    e14, e15 = _sq_err_words(a[14], a[15], w[7], row)
    return _tree16(e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15)


@triton.jit
def _code_loss(a, u, k, values_ptr, table_ptr, s2, PACKED: tl.constexpr, WORDS: tl.constexpr):
    # The loss of each block at its code index k ([B]): the WORDS pass (u: the bf16 words) or
    # _block_loss16 (u: the decision copies). Code index k is FP8 byte k + 1, the table's row.
    if WORDS:
        return _block_loss_words(a, u, table_ptr + (k + 1) * TABLE_ROW)
    return _block_loss16(a, u, tl.load(values_ptr + k), s2, PACKED)


@triton.jit
def _live(g_ptr, B: tl.constexpr):
    # Whether the global amax is finite. A non-finite one (NaN: the weight holds NaN/Inf, see
    # nvfp4_qat.recalibration._execute) turns the launch into a no-op: no block is read or written and
    # the partial sums are 0, so recalibration can queue every layer's sweep before it knows (after
    # its one host sync) which weights were finite, and still leave a non-finite layer's scales as
    # they were. nvfp4_scale_sweep raises on a non-finite global amax after the launch, and
    # nvfp4_scale_sweep_ex flags it (its block_amax is then the untouched output buffer). Known
    # cost: the arithmetic still runs.
    g = tl.full([B], 0.0, tl.float32) + tl.load(g_ptr)  # [B]: the interpreter cannot & a scalar bool
    return tl.abs(g) < float("inf")  # False for NaN too -> [B]


@triton.jit
def _load_blocks(x_ptr, rows, mask, g_ptr, B: tl.constexpr):
    # rows: [B] int64 block indices. -> |w| [B, 16] fp32, u [B, 16] fp32, s2, g (fp32 scalars)
    offs = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    absw = tl.abs(tl.load(x_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32))
    g = tl.load(g_ptr)
    s2 = tl.math.div_rn(g, tl.full([], _DIVISOR, tl.float32))
    u = tl.math.div_rn(absw, tl.full([B, 16], 0.0, tl.float32) + s2)  # correctly rounded
    return absw, u, s2, g


@triton.jit
def _argmin_all(absw, u, s2, values_ptr, NUM_CANDIDATES: tl.constexpr, B: tl.constexpr):
    # Exhaustive running argmin over all codes, ascending, strict <. -> ([B] int32, [B] fp32 loss)
    best_loss = tl.full([B], float("inf"), dtype=tl.float32)
    best_idx = tl.full([B], 0, tl.int32)
    for k in range(NUM_CANDIDATES):
        v = tl.load(values_ptr + k)
        loss = _block_loss(absw, u, v, s2, B, False)
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, k, best_idx)
    return best_idx, best_loss


@triton.jit
def _argmin_lanes(
    absw, uh, s2, values_ptr, NUM_CANDIDATES: tl.constexpr, B: tl.constexpr, LANES: tl.constexpr
):
    # The same argmin with the codes split into LANES ascending slices, one per copy of the block:
    # each slice keeps its first minimum, then the smallest loss wins and, among equal losses, the
    # smallest code: exactly the sequential first minimum. -> ([B] int32, [B] fp32 loss)
    CHUNK: tl.constexpr = (NUM_CANDIDATES + LANES - 1) // LANES
    R: tl.constexpr = B * LANES
    absw = tl.reshape(tl.broadcast_to(absw[:, None, :], [B, LANES, 16]), [R, 16])
    uh = tl.reshape(tl.broadcast_to(uh[:, None, :], [B, LANES, 16]), [R, 16])
    first = (tl.arange(0, R) % LANES) * CHUNK  # [R], first code of each row's slice
    best_loss = tl.full([R], float("inf"), dtype=tl.float32)
    best_idx = first
    for j in range(CHUNK):
        k = tl.minimum(first + j, NUM_CANDIDATES - 1)  # the last slice repeats code 125: harmless
        loss = _block_loss(absw, uh, tl.load(values_ptr + k)[:, None], s2, R, True)
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, k, best_idx)
    best_loss = tl.reshape(best_loss, [B, LANES])
    best_idx = tl.reshape(best_idx, [B, LANES])
    low = tl.reduce(best_loss, 1, _MIN)
    return tl.reduce(tl.where(best_loss == low[:, None], best_idx, NUM_CANDIDATES), 1, _MIN), low


@triton.jit
def _sweep_exhaustive_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values (format.fp8_code_values)
    cands_ptr,  # [126] fp32, code values / 448 (format.fp8_scale_candidates)
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax
    code_ptr,  # [n_blocks] uint8, FP8 byte of the winning code
    old_ptr,  # [n_blocks] uint8, FP8 byte of the block's previous scale
    part_ptr,  # [3, part_stride] fp32, per-program loss sums and changed counts; row 2: see _store_amax
    part_stride,
    n_blocks,
    NUM_CANDIDATES: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < n_blocks) & _live(g_ptr, BLOCK_B)
    absw, u, s2, g = _load_blocks(x_ptr, rows, mask, g_ptr, BLOCK_B)
    best, loss = _argmin_all(absw, u, s2, values_ptr, NUM_CANDIDATES, BLOCK_B)
    tl.store(out_ptr + rows, tl.load(cands_ptr + best) * g, mask=mask)
    _store_stats(code_ptr, old_ptr, part_ptr, part_stride, tl.program_id(0), rows, best, loss, mask, False)
    clean = tl.where(absw < float("inf"), absw, float("inf"))  # NaN -> inf
    _store_amax(part_ptr, part_stride, tl.reduce(clean, 1, _MAX), g)


@triton.jit
def _element(x_ptr, rows, j: tl.constexpr, mask):
    # Element j of each block (one thread per block): |w| (fp32), with NaN as +inf so that maxima
    # keep it. -> [B] fp32
    a = tl.abs(tl.load(x_ptr + rows * 16 + j, mask=mask, other=0.0).to(tl.float32))
    return tl.where(a < float("inf"), a, float("inf"))


@triton.jit
def _word(w_ptr, rows, j: tl.constexpr, mask):
    # Elements 2j and 2j + 1 of each block (bf16, one thread per block) as one word, sign cleared:
    # |w| in both halves, element 2j in the low one. -> [B] int32
    return tl.load(w_ptr + rows * 8 + j, mask=mask, other=0) & 0x7FFF7FFF


@triton.jit
def _quotient(a, ns2, y, cap):
    # u = fl(a / s2) by multiplying with y = fl(1 / s2) and two FMA corrections (CUDA's div.rn
    # makes its reciprocal, and checks its range, per element: ~11 instructions against 6 here).
    # Exact where a decision needs it: q0 = fl(a * y) is within 1.5 ulp of a / s2, so q1 is within
    # 1 ulp, and then (Markstein's theorem: y within half an ulp of 1 / s2, q1 within 1 ulp of the
    # quotient, the remainder a - q1 * s2 exact in the FMA) q2 is the correctly rounded quotient.
    # The remainder is exact while it is a multiple of 2**-149: it is one of ulp(q) * ulp(s2), and
    # with s2 >= 2**-90 (below that _TINY_S2 sends every block to the exhaustive pass, which
    # divides) and u >= 2**-12 (smaller u fall below every threshold, >= 2**-11, either way) that
    # is 2**-148 or more. a is capped at 4096 * s2 so that nothing overflows: u >= 4096 passes
    # every threshold (<= 5 * 448) as a larger u would. (For s2 above ~2**116 the cap is inf; then
    # a finite a cannot overflow u, and a = inf, from a NaN/Inf weight, gives NaN: that block's
    # loss is inf at every code either way.) tests/test_packed_pass.py runs this function under
    # Triton's interpreter (whose FMA rounds once) and compiled on a GPU, against a division.
    # (ns2 = -s2: a negated product, and no negation of q per step, which Triton emits as an add.)
    a = tl.minimum(a, cap)
    q = a * y
    q = tl.fma(tl.fma(q, ns2, a), y, q)
    return tl.fma(tl.fma(q, ns2, a), y, q)


@triton.jit
def _odd_pair(u0, u1):
    # _ODD_PAIR_ASM: the fp16 decision copies of two elements in one word. -> [B] int32
    return tl.inline_asm_elementwise(_ODD_PAIR_ASM, "=r,f,f", [u0, u1], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _decision_copies(a, s2, PACKED: tl.constexpr):
    # The fp16 decision copies of u = fl(|w| / s2) for the 16 elements a: with PACKED, 8 words of
    # two (element 2i in the low half; _quotient and _ODD_PAIR_ASM), else 16 fp16 vectors
    # (_odd_f16 of a correctly rounded division: what the interpreter runs). The same copies
    # where a decision depends on them (below 2**-14 the fp16 values differ, and fail every
    # threshold either way).
    if PACKED:
        y = tl.math.div_rn(tl.full(s2.shape, 1.0, tl.float32), s2)
        cap = s2 * _U_CAP
        ns2 = -s2
        u = (
            _odd_pair(_quotient(a[0], ns2, y, cap), _quotient(a[1], ns2, y, cap)),
            _odd_pair(_quotient(a[2], ns2, y, cap), _quotient(a[3], ns2, y, cap)),
            _odd_pair(_quotient(a[4], ns2, y, cap), _quotient(a[5], ns2, y, cap)),
            _odd_pair(_quotient(a[6], ns2, y, cap), _quotient(a[7], ns2, y, cap)),
            _odd_pair(_quotient(a[8], ns2, y, cap), _quotient(a[9], ns2, y, cap)),
            _odd_pair(_quotient(a[10], ns2, y, cap), _quotient(a[11], ns2, y, cap)),
            _odd_pair(_quotient(a[12], ns2, y, cap), _quotient(a[13], ns2, y, cap)),
            _odd_pair(_quotient(a[14], ns2, y, cap), _quotient(a[15], ns2, y, cap)),
        )
    else:  # one return: Triton 3.6 checks that every return statement has the same types
        u = (
            _odd_f16(tl.math.div_rn(a[0], s2)), _odd_f16(tl.math.div_rn(a[1], s2)),
            _odd_f16(tl.math.div_rn(a[2], s2)), _odd_f16(tl.math.div_rn(a[3], s2)),
            _odd_f16(tl.math.div_rn(a[4], s2)), _odd_f16(tl.math.div_rn(a[5], s2)),
            _odd_f16(tl.math.div_rn(a[6], s2)), _odd_f16(tl.math.div_rn(a[7], s2)),
            _odd_f16(tl.math.div_rn(a[8], s2)), _odd_f16(tl.math.div_rn(a[9], s2)),
            _odd_f16(tl.math.div_rn(a[10], s2)), _odd_f16(tl.math.div_rn(a[11], s2)),
            _odd_f16(tl.math.div_rn(a[12], s2)), _odd_f16(tl.math.div_rn(a[13], s2)),
            _odd_f16(tl.math.div_rn(a[14], s2)), _odd_f16(tl.math.div_rn(a[15], s2)),
        )  # fmt: skip
    return u


@triton.jit
def _sweep_pruned_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values
    cands_ptr,  # [126] fp32, code values / 448
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax (flagged blocks are left to the second pass)
    code_ptr,  # [n_blocks] uint8, FP8 byte of the winning code
    old_ptr,  # [n_blocks] uint8, FP8 byte of the block's previous scale
    part_ptr,  # [3, part_stride] fp32, per-program loss sums and changed counts; row 2: see _store_amax
    part_stride,
    work_ptr,  # [n_blocks] int32, indices of flagged blocks
    count_ptr,  # [1] int32, number of flagged blocks (zeroed by the caller)
    n_blocks,
    table_ptr,  # [128 * TABLE_ROW] int32, _sweep_table_kernel's table of g (read with WORDS only)
    NUM_CANDIDATES: tl.constexpr,
    FIRST_DOUBLING: tl.constexpr,  # first k from which v[k + 8] == 2 * v[k] (normal codes)
    N_BELOW: tl.constexpr,  # codes scored below k0 by every block
    N_EXTRA: tl.constexpr,  # further codes below, scored by a tile only where its bound fails
    PACKED: tl.constexpr,  # _PAIR_ASM (CUDA) or _sq_err (the interpreter): the same result
    WORDS: tl.constexpr,  # bf16 x on sm_90: _WORDS_PAIR_ASM on the weight's pairs and the table
    BLOCK_B: tl.constexpr,
):
    # One thread per block: its 16 elements are 16 [B] vectors, so the per-code values (thresholds,
    # magnitudes) are made once per block and the 16-element sum needs no shuffles. Against the
    # [B, 16] tile (2 threads per block) of _block_loss: 21.3 -> 17.6 SASS instructions per
    # element-code (sm_90, Triton 3.6, window unrolled) and 0.336 -> 0.323 ms through launch_sweep on an
    # 8192x4096 bf16 weight (H200, bench_sweep.py), same result.
    N_WINDOW: tl.constexpr = N_BELOW + 8
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < n_blocks) & _live(g_ptr, BLOCK_B)  # all False: nothing read, written or flagged
    g = tl.load(g_ptr)
    s2 = tl.math.div_rn(g, tl.full([], _DIVISOR, tl.float32))
    s2v = tl.full([BLOCK_B], 0.0, tl.float32) + s2
    if WORDS:  # the bf16 pairs themselves decide (u holds the words), |w| widened by shifts. A NaN
        # |w| stays NaN in a (not inf, as _element makes it), but m is inf either way: k0 = 126,
        # the saturation bound fails, and the block goes to the work list's exhaustive pass, which
        # reads x again, as on the other path; the input checks see it through m.
        w_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        u = (
            _word(w_ptr, rows, 0, mask), _word(w_ptr, rows, 1, mask), _word(w_ptr, rows, 2, mask),
            _word(w_ptr, rows, 3, mask), _word(w_ptr, rows, 4, mask), _word(w_ptr, rows, 5, mask),
            _word(w_ptr, rows, 6, mask), _word(w_ptr, rows, 7, mask),
        )  # fmt: skip
        a0, a1 = _bf16_halves(u[0])
        a2, a3 = _bf16_halves(u[1])
        a4, a5 = _bf16_halves(u[2])
        a6, a7 = _bf16_halves(u[3])
        a8, a9 = _bf16_halves(u[4])
        a10, a11 = _bf16_halves(u[5])
        a12, a13 = _bf16_halves(u[6])
        a14, a15 = _bf16_halves(u[7])
        top = _bf16_max(
            _bf16_max(_bf16_max(u[0], u[1]), _bf16_max(u[2], u[3])),
            _bf16_max(_bf16_max(u[4], u[5]), _bf16_max(u[6], u[7])),
        )
        top_lo, top_hi = _bf16_halves(top)
        m = tl.maximum(top_lo, top_hi, propagate_nan=tl.PropagateNan.ALL)  # NaN in either half wins
        m = tl.where(m < float("inf"), m, float("inf"))  # NaN (the packed max keeps it) -> inf
        a = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
    else:
        a0 = _element(x_ptr, rows, 0, mask)
        a1 = _element(x_ptr, rows, 1, mask)
        a2 = _element(x_ptr, rows, 2, mask)
        a3 = _element(x_ptr, rows, 3, mask)
        a4 = _element(x_ptr, rows, 4, mask)
        a5 = _element(x_ptr, rows, 5, mask)
        a6 = _element(x_ptr, rows, 6, mask)
        a7 = _element(x_ptr, rows, 7, mask)
        a8 = _element(x_ptr, rows, 8, mask)
        a9 = _element(x_ptr, rows, 9, mask)
        a10 = _element(x_ptr, rows, 10, mask)
        a11 = _element(x_ptr, rows, 11, mask)
        a12 = _element(x_ptr, rows, 12, mask)
        a13 = _element(x_ptr, rows, 13, mask)
        a14 = _element(x_ptr, rows, 14, mask)
        a15 = _element(x_ptr, rows, 15, mask)
        a = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        u = _decision_copies(a, s2v, PACKED)
        m = tl.maximum(
            tl.maximum(tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3)), tl.maximum(tl.maximum(a4, a5), tl.maximum(a6, a7))),
            tl.maximum(tl.maximum(tl.maximum(a8, a9), tl.maximum(a10, a11)), tl.maximum(tl.maximum(a12, a13), tl.maximum(a14, a15))),
        )  # fmt: skip
    u_max = tl.math.div_rn(m, s2v)  # the largest u: rounding is monotone

    # k0 = first code with 6 * v >= u_max (126 if none): binary search over the table.
    lo = tl.full([BLOCK_B], 0, tl.int32)
    hi = tl.full([BLOCK_B], NUM_CANDIDATES, tl.int32)
    for _ in tl.static_range(7):  # 2**7 > 126
        mid = (lo + hi) // 2
        ok = _QMAX * tl.load(values_ptr + tl.minimum(mid, NUM_CANDIDATES - 1)) >= u_max
        active = lo < hi
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    k0 = lo

    # Score the window [start, start + N_WINDOW), which always covers [k0 - N_BELOW, k0 + 7].
    start = tl.minimum(tl.maximum(k0 - N_BELOW, 0), NUM_CANDIDATES - N_WINDOW)
    best_loss = tl.full([BLOCK_B], float("inf"), tl.float32)
    best_idx = start
    # A loop, not unrolled: unrolling the 11 codes of 16 elements took ptxas ~35 s per specialization
    # (4.5 s as a loop, Triton 3.6 on the CPU) for the same ~14 instructions per element-code.
    for i in range(N_WINDOW):
        loss = _code_loss(a, u, start + i, values_ptr, table_ptr, s2, PACKED, WORDS)
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, start + i, best_idx)

    # Below the window: the max element's saturation error bounds every smaller code's loss. Where
    # the bound at start - 1 does not beat the best loss yet (about 1 block in 100), the whole tile
    # scores one more code downwards, up to N_EXTRA times: for the other blocks that code is
    # already beaten, and a lower code wins a tie (<=). Blocks still unresolved are flagged.
    gap = tl.maximum(m - _QMAX * (tl.load(values_ptr + tl.maximum(start - 1, 0)) * s2), 0.0)
    bound_fails = (start > 0) & ~(gap * gap > best_loss)
    for _ in tl.static_range(N_EXTRA):
        if tl.reduce(bound_fails.to(tl.int32), None, _MAX) > 0:
            start = tl.maximum(start - 1, 0)
            loss = _code_loss(a, u, start, values_ptr, table_ptr, s2, PACKED, WORDS)
            better = bound_fails & (loss <= best_loss)
            best_loss = tl.where(better, loss, best_loss)
            best_idx = tl.where(better, start, best_idx)
            gap = tl.maximum(m - _QMAX * (tl.load(values_ptr + tl.maximum(start - 1, 0)) * s2), 0.0)
            bound_fails = (start > 0) & ~(gap * gap > best_loss)
    # Above: the doubling argument needs a normal v[k0] (zero blocks score 0 at every code).
    subnormal = (k0 < FIRST_DOUBLING) & (m > 0)
    tiny = s2v < _TINY_S2  # a property of the whole tensor
    flag = (bound_fails | subnormal | tiny) & mask

    tl.store(out_ptr + rows, tl.load(cands_ptr + best_idx) * g, mask=mask & ~flag)
    _store_stats(code_ptr, old_ptr, part_ptr, part_stride, tl.program_id(0), rows, best_idx, best_loss,
                 mask & ~flag, False)  # fmt: skip
    _store_amax(part_ptr, part_stride, m, g)
    # One atomic per flagged block (about 1 in 100): each gets its own slot in the list.
    slot = tl.atomic_add(count_ptr + tl.full([BLOCK_B], 0, tl.int32), 1, mask=flag, sem="relaxed")
    tl.store(work_ptr + slot, rows.to(tl.int32), mask=flag & (slot < n_blocks))


@triton.jit
def _store_stats(
    code_ptr, old_ptr, part_ptr, part_stride, slot, rows, best, loss, mask, ATOMIC: tl.constexpr
):
    # Code index k is FP8 byte k + 1 (the table starts at 0x01). The tile's sum of the winning
    # losses (the reference's scores) and its count of blocks whose byte changed go to slot `slot`
    # of the two partial rows: stored by the pruned/exhaustive programs (one slot each), added
    # atomically by the work list's tiles (one shared slot; these blocks are rare).
    code = (best + 1).to(tl.uint8)
    tl.store(code_ptr + rows, code, mask=mask)
    old = tl.load(old_ptr + rows, mask=mask, other=0)
    loss_sum = tl.reduce(tl.where(mask, loss, 0.0), 0, _SUM)
    changed = tl.reduce(tl.where(mask & (code != old), 1.0, 0.0), 0, _SUM)  # exact: < 2**24
    if ATOMIC:
        tl.atomic_add(part_ptr + slot, loss_sum, sem="relaxed")  # read after the kernel: no fence
        tl.atomic_add(part_ptr + part_stride + slot, changed, sem="relaxed")
    else:
        tl.store(part_ptr + slot, loss_sum)
        tl.store(part_ptr + part_stride + slot, changed)


@triton.jit
def _store_amax(part_ptr, part_stride, block_max, g):
    # Row 2 of the partials: max |x| over the tensor, +inf if it holds NaN or Inf, as an atomic max
    # of each tile's into column pid % AMAX_SLOTS (fewer tiles per address), and the global amax in
    # column AMAX_SLOTS. The public sweep validates its input from these AMAX_SLOTS + 1 values after
    # the launch (one host read, or one small launch in nvfp4_scale_sweep_ex): no pass over x.
    # block_max: [B] per-block max |x| with NaN as +inf (a max would drop NaN); masked rows are 0.
    tile_max = tl.reduce(block_max, 0, _MAX)
    pid = tl.program_id(0)
    row = part_ptr + 2 * part_stride
    # As int32 bits (non-negative floats order as their bits), relaxed: one atomic and no fence. A
    # float atomic max (two integer atomics, each with the fences of the default acq_rel ordering)
    # cost the pruned pass 4% on an H200, into one column or into 32.
    bits = (row + pid % AMAX_SLOTS).to(tl.pointer_type(tl.int32), bitcast=True)
    tl.atomic_max(bits, tile_max.to(tl.int32, bitcast=True), sem="relaxed")
    if pid == 0:
        tl.store(row + AMAX_SLOTS, g)


@triton.jit
def _sweep_listed(
    x_ptr, values_ptr, cands_ptr, g_ptr, out_ptr, code_ptr, old_ptr, part_ptr, part_stride, acc_slot,
    work_ptr, tile, count, NUM_CANDIDATES, BLOCK_B, LANES
):  # fmt: skip
    # Exhaustive sweep of the listed blocks work[tile * BLOCK_B :][:BLOCK_B] (those below count).
    slots = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = slots < count
    rows = tl.load(work_ptr + slots, mask=mask, other=0).to(tl.int64)
    absw, u, s2, g = _load_blocks(x_ptr, rows, mask, g_ptr, BLOCK_B)
    best, loss = _argmin_lanes(absw, _odd_f16(u), s2, values_ptr, NUM_CANDIDATES, BLOCK_B, LANES)
    tl.store(out_ptr + rows, tl.load(cands_ptr + best) * g, mask=mask)
    _store_stats(code_ptr, old_ptr, part_ptr, part_stride, acc_slot, rows, best, loss, mask, True)


@triton.jit
def _sweep_worklist_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values
    cands_ptr,  # [126] fp32, code values / 448
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax
    code_ptr,  # [n_blocks] uint8, FP8 byte of the winning code
    old_ptr,  # [n_blocks] uint8, FP8 byte of the block's previous scale
    part_ptr,  # [3, part_stride] fp32, per-program sums (rows 0 and 1 here)
    part_stride,
    acc_slot,  # slot of part_ptr that the listed blocks' sums are added to
    work_ptr,  # [n_blocks] int32, block indices to sweep exhaustively
    count_ptr,  # [1] int32, how many entries of work_ptr are valid
    NUM_CANDIDATES: tl.constexpr,
    BLOCK_B: tl.constexpr,
    LANES: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    count = tl.load(count_ptr)
    if PERSISTENT:  # CUDA: the list's length is only known on the device, so loop up to it
        n_tiles = (count + BLOCK_B - 1) // BLOCK_B
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _sweep_listed(x_ptr, values_ptr, cands_ptr, g_ptr, out_ptr, code_ptr, old_ptr, part_ptr, part_stride,
                          acc_slot, work_ptr, tile, count, NUM_CANDIDATES, BLOCK_B, LANES)  # fmt: skip
    else:  # one tile per program, the grid sized by the caller (Triton 3.6's interpreter
        # cannot loop to a bound read from memory)
        _sweep_listed(x_ptr, values_ptr, cands_ptr, g_ptr, out_ptr, code_ptr, old_ptr, part_ptr, part_stride,
                      acc_slot, work_ptr, tl.program_id(0), count, NUM_CANDIDATES, BLOCK_B, LANES)  # fmt: skip


_INFO_BAD_G = tl.constexpr(INFO_BAD_GLOBAL_AMAX)
_INFO_NONFINITE = tl.constexpr(INFO_NONFINITE_X)
_INFO_ZERO = tl.constexpr(INFO_ALL_ZERO)
_ZERO_U = tl.constexpr(ZERO_U_BOUND)


@triton.jit
def _sweep_info_kernel(
    checks_ptr,  # [AMAX_SLOTS + 1] fp32: the launch's max |x| per slot, then the global amax
    info_ptr,  # [1] int32 out
):
    # nvfp4_qat.sweep._raise_if_invalid's rule as a code, on the device (nvfp4_scale_sweep_ex: no
    # host sync; a dozen small torch launches instead cost the host more than the sweep's GPU
    # time). [AMAX_SLOTS] vectors throughout: the interpreter cannot combine scalar booleans.
    i = tl.arange(0, AMAX_SLOTS)
    amax = tl.full([AMAX_SLOTS], 0.0, tl.float32) + tl.reduce(
        tl.load(checks_ptr + i), 0, _MAX
    )  # NaN came as inf
    g = tl.load(checks_ptr + AMAX_SLOTS + i * 0)
    u = tl.math.div_rn(amax, tl.math.div_rn(g, tl.full([AMAX_SLOTS], _DIVISOR, tl.float32)))  # / s2
    bad_g = ~((g >= 0.0) & (g < float("inf")))  # NaN fails both
    nonfinite = ~(amax < float("inf"))
    zero = (amax > 0.0) & ((g == 0.0) | (u <= _ZERO_U))
    code = tl.where(bad_g, _INFO_BAD_G, tl.where(nonfinite, _INFO_NONFINITE, tl.where(zero, _INFO_ZERO, 0)))
    tl.store(info_ptr + i, code, mask=i == 0)


#: Floats on each side of the guess fl(midpoint * v * s2) among which the table finds a threshold
#: (format.decision_table's window, restated here: tests compare the two tables bit for bit).
_TABLE_WINDOW = tl.constexpr(4)


@triton.jit
def _sweep_table_kernel(
    g_ptr,  # [T] fp32, the global amax of each tensor
    values_ptr,  # [126] fp32, FP8 code values (bytes 1..126)
    table_ptr,  # [T, 128, TABLE_ROW] int32 out
    NUM_CANDIDATES: tl.constexpr,
):
    # The WORDS pass's table of one tensor (one program each): for FP8 byte c (code value e; 0 for
    # bytes 0 and 127), format.decision_table(s2)[c] with each threshold rounded up to bf16 in both
    # halves of a word (a carry out of the low 16 bits is the next bf16 up; +inf stays +inf), and
    # the scale fl(e * s2) as fp32 bits. The search is decision_table's: the first of the 9 floats
    # around fl(midpoint * e * s2) whose correctly rounded quotient by s2 passes midpoint * e (ties by
    # the format's flag), the lowest of them if none does.
    t = tl.program_id(0)
    s2 = tl.math.div_rn(tl.load(g_ptr + t), tl.full([], _DIVISOR, tl.float32))
    byte = tl.arange(0, 128)[:, None]
    col = tl.arange(0, TABLE_ROW)[None, :]
    e = tl.load(values_ptr + byte - 1, mask=(byte >= 1) & (byte <= NUM_CANDIDATES), other=0.0)  # [128, 1]
    mid = tl.where(col == 0, _M1, tl.where(col == 1, _M2, tl.where(col == 2, _M3, tl.where(col == 3, _M4,
          tl.where(col == 4, _M5, tl.where(col == 5, _M6, tl.where(col == 6, _M7, 0.0)))))))  # fmt: skip
    down = tl.where(col == 0, _D1, tl.where(col == 1, _D2, tl.where(col == 2, _D3, tl.where(col == 3, _D4,
           tl.where(col == 4, _D5, tl.where(col == 5, _D6, _D7))))))  # fmt: skip
    target = e * mid  # exact: <= 7 significant bits
    s2v = tl.full([128, TABLE_ROW], 0.0, tl.float32) + s2
    guess = (target * s2v).to(tl.int32, bitcast=True)
    found = tl.full([128, TABLE_ROW], 0, tl.int1)
    threshold = tl.maximum(guess - _TABLE_WINDOW, 0).to(tl.float32, bitcast=True)
    for step in tl.static_range(-_TABLE_WINDOW, _TABLE_WINDOW + 1):
        cand = tl.maximum(guess + step, 0).to(tl.float32, bitcast=True)
        u = tl.math.div_rn(cand, s2v)
        passed = tl.where(down != 0, u > target, u >= target)
        threshold = tl.where(passed & ~found, cand, threshold)
        found = found | passed
    threshold = tl.where(e > 0, threshold, float("inf"))
    # Rounded up as fake_quant._BF16_CEIL_ASM does, in integer operations: this kernel also runs
    # under the interpreter, which cannot run inline PTX.
    up = (threshold.to(tl.uint32, bitcast=True) + 0xFFFF) >> 16
    words = ((up << 16) | up).to(tl.int32, bitcast=True)
    scale = (e * s2v).to(tl.int32, bitcast=True)
    tl.store(table_ptr + t * (128 * TABLE_ROW) + byte * TABLE_ROW + col, tl.where(col == 7, scale, words))


def interpreted(name: str) -> InterpretedFunction:
    """The kernel ``name`` of this module, built for Triton's CPU interpreter."""
    return _interpret.interpreted(__name__, name)
