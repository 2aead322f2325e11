"""Fused NVFP4 fake-quantization in Triton: one read and one write per element, no division.

Computes exactly :func:`nvfp4_qat.format.fake_quantize_unchecked` (and so
:func:`~nvfp4_qat.fake_quantize_nvfp4`), bit for bit, for fp32/fp16/bf16 tensors whose last dim is
a multiple of 16. The kernel does not divide: it receives each block's FP8 byte
(:func:`~nvfp4_qat.format.block_code_bytes`) and the tensor's :func:`~nvfp4_qat.format.decision_table`,
which restates the format's rounding decision ``u = |x| / s2`` against ``midpoint * e`` as seven
thresholds on ``|x|`` itself (exact, because the rounded division is monotone). Per element::

    a = |x|                                       # exact widening to fp32
    q = E2M1 value of the number of thresholds a >= table[code, k] passes (k = 0..6)
    out = copysign(q * table[code, 7], x)         # q * (e * s2) in fp32, cast to x.dtype
    out = NaN (sign of x) where x is NaN or Inf   # never a finite value for a non-finite input

Why the result is exact and portable:

* The FP8 rounding and the threshold search run in PyTorch (:mod:`nvfp4_qat.format`), once per
  scale change (``NVFP4Linear`` caches them) and at a sixteenth of the elements at most; the
  kernel only compares, selects and multiplies once, so there is nothing to contract into an FMA.
* bf16 is converted by bit manipulation (widening is a shift; narrowing is the usual round to
  nearest even on the fp32 bits), which is exact on the GPU and in Triton's CPU interpreter alike
  (the interpreter's own fp32 -> bf16 cast truncates).

The stats kernel (:func:`fake_quant_stats_triton`, :func:`stats_partials`) reads the same way and
stores, instead of a tensor, three fp32 partial sums per program: the squared NVFP4 error
``(q * e * s2 - |x|)^2`` in fp32 (the error the scale sweep minimises), ``max |x|`` (NaN if any
element is NaN) and ``sum x^2``; one launch covers many tensors of one dtype, and
:func:`segment_totals` reduces the partial sums per tensor. Recalibration gets the stale-scale error,
the new global amax (and with it the finiteness check) and the weight energy from one read of each
weight.

Tile: ``ROWS`` blocks of 16, ``TILES`` tiles per program (:data:`CONFIGS`;
``benchmarks/bench_qat_step.py --configs`` times each). Tests pin every candidate in turn. Each
block's table row arrives in one 32-byte load (``_magnitude``), not eight gathers.
"""

from __future__ import annotations

import itertools
import struct
import typing

import torch
import triton
import triton.language as tl

from nvfp4_qat._backend import launch_device, on_device, require_triton
from nvfp4_qat._validation import check_block_amax, check_global_amax, check_x
from nvfp4_qat.format import E2M1_VALUES, block_code_bytes, decision_table, global_scale
from nvfp4_qat.kernels import _interpret
from nvfp4_qat.kernels._launch import launch

__all__ = [
    "CONFIGS",
    "DEFAULT_CONFIG",
    "STATS_CONFIG",
    "fake_quant_prepared",
    "fake_quant_stats_triton",
    "fake_quant_triton",
    "prepare",
    "segment_totals",
    "stats_partials",
    "stats_prepared",
]

#: Candidate launch configurations: ``ROWS`` blocks of 16 per tile, warps, and optionally ``TILES``
#: tiles per program (default 1).
CONFIGS: tuple[dict[str, int], ...] = (
    {"ROWS": 32, "num_warps": 2},
    {"ROWS": 64, "num_warps": 4},
    {"ROWS": 128, "num_warps": 4},
    {"ROWS": 256, "num_warps": 8},
    {"ROWS": 64, "num_warps": 2, "TILES": 8},
)
#: The forward's default. On an H100 (11008x4096 bf16, cached bytes and table, ``bench_qat_step.py
#: --configs``): R32 w2 0.0804 ms, R64 w4 0.0805, R128 w4 0.1040, R256 w8 0.1111, R64 w2 t8 0.1027.
DEFAULT_CONFIG: dict[str, int] = CONFIGS[1]
#: The stats pass's default: 512 blocks per program in 8 tiles, summed in registers. Measured on an
#: H100 with a standalone copy of the stats kernel (one 14336x4096 bf16 weight, medians of
#: ``triton.testing.do_bench``): 0.084 ms, against 0.086 ms for 4 tiles of 128 blocks, 0.091 ms for
#: one 128-block tile per program, 0.135 ms with the table read by eight scalar gathers per block
#: and 0.051 ms for max and energy alone (no table: the memory floor).
STATS_CONFIG: dict[str, int] = CONFIGS[4]

# The E2M1 grid's steps (format.py's values): 0.5 below 2, 1 up to 4, then 2 to 6. _magnitude sums
# them as (four low steps) * 0.5 + (two middle steps) + (top step) * 2.
_STEPS = [hi - lo for lo, hi in itertools.pairwise(E2M1_VALUES)]
if _STEPS != [_STEPS[0]] * 4 + [2 * _STEPS[0]] * 2 + [4 * _STEPS[0]] or 2 * _STEPS[0] != 1.0:
    raise RuntimeError(f"_magnitude assumes the E2M1 steps 0.5 x4, 1 x2, 2; format.py has {_STEPS}")
_STEP_LOW = tl.constexpr(_STEPS[0])
_STEP_TOP = tl.constexpr(_STEPS[-1])


def _bf16x2(x: float) -> str:
    """``x`` (exact in bf16) in both halves of a 32-bit word, as a PTX immediate."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if bits & 0xFFFF:
        raise ValueError(f"{x} is not exact in bf16")
    return f"0x{bits | bits >> 16:08x}"


# The stats pass on bf16 weights (CUDA, sm_90): the E2M1 decisions of two elements per instruction,
# straight on the loaded bf16 pair. A bf16 |x| passes an fp32 threshold t exactly when it passes t
# rounded up to bf16 (the next bf16 at or above t: |x| has no bits between), so the seven thresholds
# of a block, rounded up (_bf16_threshold_words), decide both halves of a word with one `set`, which
# writes 1.0 / 0.0 per half; the sums of the format's steps are exact (multiples of 0.5 up to 6, in
# bf16's 8 bits). Against the fp32 path (a widening and seven FSETs per element) the tile loop issues
# about half the instructions (`benchmarks/kernel_variants.py --sass`). A NaN passes no threshold
# either way (an ordered compare), and +inf passes every one, as in _magnitude.
def bf16_decisions_ptx(dst: str, a: str, first: int) -> str:
    """PTX text: ``dst`` = the E2M1 magnitudes (bf16x2) of the bf16x2 |x| in register ``a`` against the
    seven threshold words ``$first`` .. ``$first + 6`` (ascending; bf16, both halves): one `set` per
    threshold, the format's steps summed by runs (0.5 x4, 1 x2, 2). Scratch registers: c, r, w (.b32),
    declared by the caller; ``dst`` may not be one of them. Shared with the sweep's bf16 pass."""
    return (
        f"set.ge.bf16x2.bf16x2 {dst}, {a}, ${first}; "
        + "".join(
            f"set.ge.bf16x2.bf16x2 c, {a}, ${first + k}; add.rn.bf16x2 {dst}, {dst}, c; " for k in (1, 2, 3)
        )
        + f"set.ge.bf16x2.bf16x2 r, {a}, ${first + 4}; set.ge.bf16x2.bf16x2 c, {a}, ${first + 5}; "
        + "add.rn.bf16x2 r, r, c; "
        + f"mov.b32 w, {_bf16x2(_STEPS[0])}; fma.rn.bf16x2 {dst}, {dst}, w, r; "
        + f"set.ge.bf16x2.bf16x2 c, {a}, ${first + 6}; mov.b32 w, {_bf16x2(_STEPS[-1])}; "
        + f"fma.rn.bf16x2 {dst}, c, w, {dst}; "
    )


#: $0, $1 out: the pair's E2M1 magnitudes q and its |x| (bf16x2 each); $2: the pair as loaded
#: (element 2i in the low half); $3..$9: the block's thresholds as bf16 words (_bf16_threshold_words).
_BF16_PAIR_ASM = tl.constexpr(
    "{ .reg .b32 a, c, q, r, w; and.b32 a, $2, 0x7fff7fff; mov.b32 $1, a; "
    + bf16_decisions_ptx("q", "a", 3)
    + "mov.b32 $0, q; }"
)
#: $0 out: the larger of $1 and $2 (bf16x2) in each half, NaN where either is NaN.
_BF16_MAX_ASM = tl.constexpr("{ max.NaN.bf16x2 $0, $1, $2; }")
#: $0 out: fp32 bits $1 (>= 0 or +inf) rounded up to bf16, in both halves (_bf16_threshold_words).
_BF16_CEIL_ASM = tl.constexpr("{ .reg .b32 t; add.u32 t, $1, 0xffff; prmt.b32 $0, t, t, 0x3232; }")


@triton.jit
def _add(a, b):
    # tl.sum's combine; spelled out because tl.sum is itself a jitted function of Triton's, which an
    # interpreted kernel cannot call (kernels._interpret only interprets this module's functions).
    return a + b


@triton.jit
def _max(a, b):
    # NaN wins (fmax would drop it): a NaN anywhere in the weight makes its max NaN, so that
    # recalibration can tell non-finite weights from the max alone (Inf is already the max).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _widen(raw, BF16: tl.constexpr):
    # The loaded tile as fp32: bf16 (held as int16 bits) by a shift, exact on the GPU and in the
    # interpreter alike; fp16/fp32 by a cast.
    if BF16:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return raw.to(tl.float32)


@triton.jit
def _table_row(code, table_ptr, ROWS: tl.constexpr):
    # Table row `code` [ROWS, 1] of each block: its 7 thresholds and its scale, [ROWS] each. The row
    # arrives in one 32-byte load per block, split into its 8 columns: eight scalar gathers per
    # block made the stats pass 1.6x slower.
    tbl = tl.load(table_ptr + code.to(tl.int32) * 8 + tl.arange(0, 8)[None, :])  # [ROWS, 8]
    even, odd = tl.split(tl.reshape(tbl, [ROWS, 4, 2]))  # columns 0 2 4 6 | 1 3 5 7
    e04, e26 = tl.split(tl.reshape(even, [ROWS, 2, 2]))
    o15, o37 = tl.split(tl.reshape(odd, [ROWS, 2, 2]))
    t0, t4 = tl.split(e04)
    t2, t6 = tl.split(e26)
    t1, t5 = tl.split(o15)
    t3, scale = tl.split(o37)
    return t0, t1, t2, t3, t4, t5, t6, scale


@triton.jit
def _magnitude(a, code, table_ptr, ROWS: tl.constexpr):
    # NVFP4 magnitude (fp32) of |x| = a [ROWS, 16] for the blocks' FP8 bytes `code` [ROWS, 1]:
    # q * (e * s2), q the E2M1 value of the number of thresholds of table row `code` that a passes.
    t0, t1, t2, t3, t4, t5, t6, scale = _table_row(code, table_ptr, ROWS)
    # q = the sum of the format's steps over the thresholds passed (0.5 x4, 1 x2, 2: exact in fp32).
    # Each decision as 1.0/0.0 compiles to one FSET (sm_90) and the sum to FP adds, where a chain
    # of selects cost a compare and a select per threshold, both at half the rate of FP arithmetic:
    # the stats pass was bound by them (its tile loop: 23.9 instructions per element, 17.6 of them
    # half-rate; now 22.8 and 10.6: `benchmarks/kernel_variants.py --sass`, Triton 3.6). A NaN
    # passes no threshold either way.
    c0 = (a >= t0[:, None]).to(tl.float32)
    c1 = (a >= t1[:, None]).to(tl.float32)
    c2 = (a >= t2[:, None]).to(tl.float32)
    c3 = (a >= t3[:, None]).to(tl.float32)
    c4 = (a >= t4[:, None]).to(tl.float32)
    c5 = (a >= t5[:, None]).to(tl.float32)
    c6 = (a >= t6[:, None]).to(tl.float32)
    q = tl.fma((c0 + c1) + (c2 + c3), _STEP_LOW, tl.fma(c6, _STEP_TOP, c4 + c5))
    return q * scale[:, None]  # >= 0: q * (e * s2), the product of format.fake_quantize_unchecked


@triton.jit
def _fake_quant_kernel(
    x_ptr,  # [n_blocks * 16] fp32 | fp16 | int16 (bf16 bits), contiguous
    code_ptr,  # [n_blocks] uint8, FP8 byte of each block (format.block_code_bytes)
    table_ptr,  # [128 * 8] fp32, format.decision_table(s2)
    out_ptr,  # [n_blocks * 16] same dtype as x_ptr
    n_blocks,  # int, number of 16-blocks
    ROWS: tl.constexpr,  # blocks per tile
    TILES: tl.constexpr,  # tiles per program, one after another
    BF16: tl.constexpr,  # x and out hold bf16 bit patterns as int16
    EVEN: tl.constexpr,  # n_blocks is a multiple of ROWS * TILES: no masks (full-width vector loads)
):
    for tile in range(TILES):
        # [ROWS, 1]: per-block values share the tile's layout
        rows = (tl.program_id(0) * TILES + tile) * ROWS + tl.arange(0, ROWS)[:, None]
        # The mask is a [ROWS, 1] column broadcast over the 16 elements, so the compiler still sees
        # rows of 16 contiguous elements under one predicate and keeps vector loads.
        mask = None if EVEN else rows < n_blocks
        offs = rows.to(tl.int64) * 16 + tl.arange(0, 16)[None, :]  # [ROWS, 16]
        if EVEN:
            raw = tl.load(x_ptr + offs)
            code = tl.load(code_ptr + rows)
        else:  # masked rows read 0 and code 0 (infinite thresholds, scale 0)
            raw = tl.load(x_ptr + offs, mask=mask, other=0)
            code = tl.load(code_ptr + rows, mask=mask, other=0)
        xbits = _widen(raw, BF16).to(tl.uint32, bitcast=True)
        a = (xbits & 0x7FFFFFFF).to(tl.float32, bitcast=True)  # |x|, NaN stays NaN
        _quantize_store(out_ptr, offs, rows, n_blocks, a, xbits, code, table_ptr, ROWS, BF16, EVEN)


@triton.jit
def _quantize_store(
    out_ptr,  # [n_blocks * 16] fp32 | fp16 | int16 (bf16 bits)
    offs,  # [ROWS, 16] int64, the tile's element offsets
    rows,  # [ROWS, 1] the tile's block indices (the mask where not EVEN)
    n_blocks,  # int, number of 16-blocks
    a,  # [ROWS, 16] fp32, |x|
    xbits,  # [ROWS, 16] uint32, x's fp32 bits
    code,  # [ROWS, 1] the blocks' FP8 bytes (rows of the table)
    table_ptr,  # [128 * 8] fp32, format.decision_table(s2)
    ROWS: tl.constexpr,
    BF16: tl.constexpr,
    EVEN: tl.constexpr,  # no mask
):
    # Store copysign(NVFP4 magnitude of |x|, x) for one tile. Shared with kernels.act_quant.
    # NaN/Inf in -> NaN out (format.py's rule): |x| < inf is false exactly for NaN and Inf.
    mag = tl.where(a < float("inf"), _magnitude(a, code, table_ptr, ROWS), float("nan"))
    out_bits = mag.to(tl.uint32, bitcast=True) | (xbits & 0x80000000)  # copysign(mag, x)
    if BF16:
        top = (out_bits + (0x7FFF + ((out_bits >> 16) & 1))) >> 16  # round to nearest even
        out = top.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        out = out_bits.to(tl.float32, bitcast=True).to(out_ptr.dtype.element_ty)
    if EVEN:  # the mask is a [ROWS, 1] column: rows of 16 contiguous elements stay vector stores
        tl.store(out_ptr + offs, out)
    else:
        tl.store(out_ptr + offs, out, mask=rows < n_blocks)


@triton.jit
def _stats_tile(x_ptr, code_ptr, table_ptr, rows, n_blocks, MASKED: tl.constexpr, ROWS: tl.constexpr,
                BF16: tl.constexpr):  # fmt: skip
    # |x| and the fp32 NVFP4 error of one tile ([ROWS, 16] each).
    offs = rows * 16 + tl.arange(0, 16)[None, :]
    if MASKED:  # masked rows read 0 and code 0 (scale 0): they add exactly 0
        raw = tl.load(x_ptr + offs, mask=rows < n_blocks, other=0)
        code = tl.load(code_ptr + rows, mask=rows < n_blocks, other=0)
    else:
        raw = tl.load(x_ptr + offs)
        code = tl.load(code_ptr + rows)
    xbits = _widen(raw, BF16).to(tl.uint32, bitcast=True)
    a = (xbits & 0x7FFFFFFF).to(tl.float32, bitcast=True)  # |x|, NaN stays NaN
    return a, _magnitude(a, code, table_ptr, ROWS) - a  # the error: NaN/Inf for a NaN/Inf weight


@triton.jit
def _bf16_threshold_words(t):
    # Thresholds t ([ROWS] fp32, >= 0 or +inf) rounded up to bf16, in both halves of an int32 word:
    # adding 0xffff carries into the upper half unless the low 16 bits are 0 (the next bf16 up;
    # +inf stays +inf), and one byte permute copies the upper half down. -> [ROWS, 1] int32
    return tl.inline_asm_elementwise(_BF16_CEIL_ASM, "=r,r", [t.to(tl.int32, bitcast=True)], dtype=tl.int32,
                                     is_pure=True, pack=1)[:, None]  # fmt: skip


@triton.jit
def _stats_tile_pairs(w_ptr, code_ptr, table_ptr, rows, n_blocks, MASKED: tl.constexpr, ROWS: tl.constexpr):
    # _stats_tile for bf16 on sm_90, read as [ROWS, 8] words of two elements (_BF16_PAIR_ASM): the
    # words of |x| (bf16x2), and the fp32 NVFP4 errors of their low and their high halves.
    offs = rows * 8 + tl.arange(0, 8)[None, :]
    if MASKED:  # masked rows read 0 and code 0 (infinite thresholds, scale 0): they add exactly 0
        words = tl.load(w_ptr + offs, mask=rows < n_blocks, other=0)
        code = tl.load(code_ptr + rows, mask=rows < n_blocks, other=0)
    else:
        words = tl.load(w_ptr + offs)
        code = tl.load(code_ptr + rows)
    t0, t1, t2, t3, t4, t5, t6, scale = _table_row(code, table_ptr, ROWS)
    q, a = _bf16_pair_magnitudes(words, t0, t1, t2, t3, t4, t5, t6)
    q_lo, q_hi = _bf16_halves(q)
    a_lo, a_hi = _bf16_halves(a)
    return a, q_lo * scale[:, None] - a_lo, q_hi * scale[:, None] - a_hi  # q * (e * s2), as _magnitude


@triton.jit
def _bf16_pair_magnitudes(words, t0, t1, t2, t3, t4, t5, t6):
    # _BF16_PAIR_ASM on [ROWS, 8] words of bf16 pairs and their blocks' fp32 thresholds ([ROWS]
    # each): (E2M1 magnitudes q, |x|), bf16x2 words. (tests/test_bf16_stats_pass.py runs it on a GPU.)
    return tl.inline_asm_elementwise(
        _BF16_PAIR_ASM, "=r,=r,r,r,r,r,r,r,r,r",
        [words, _bf16_threshold_words(t0), _bf16_threshold_words(t1), _bf16_threshold_words(t2),
         _bf16_threshold_words(t3), _bf16_threshold_words(t4), _bf16_threshold_words(t5),
         _bf16_threshold_words(t6)],
        dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _bf16_max(x, y):
    # _BF16_MAX_ASM: the larger bf16 of each half of two words, NaN where either is NaN. -> int32
    return tl.inline_asm_elementwise(_BF16_MAX_ASM, "=r,r,r", [x, y], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _bf16_halves(words):
    # The two bf16 values of each int32 word as fp32 (a widening is a shift): (low, high).
    w = words.to(tl.uint32, bitcast=True)
    return (w << 16).to(tl.float32, bitcast=True), ((w >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _stats_sums(x_ptr, code_ptr, table_ptr, first, n_blocks, MASKED: tl.constexpr, ROWS: tl.constexpr,
                TILES: tl.constexpr, BF16: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    # (sum of squared errors, max |x|, sum x^2) over TILES tiles of ROWS blocks from block `first`,
    # summed in registers, then over the tile.
    if PAIRS:
        w_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        acc_sse = tl.full([ROWS, 8], 0.0, tl.float32)
        acc_words = tl.full([ROWS, 8], 0, tl.int32)  # max |x| of each half, bf16x2
        acc_energy = tl.full([ROWS, 8], 0.0, tl.float32)
        for tile in range(TILES):
            rows = first + tile * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
            a, d0, d1 = _stats_tile_pairs(w_ptr, code_ptr, table_ptr, rows, n_blocks, MASKED, ROWS)
            acc_sse += d0 * d0  # one FMA per element and sum (the two halves in turn)
            acc_sse += d1 * d1
            acc_words = _bf16_max(acc_words, a)
            a0, a1 = _bf16_halves(a)
            acc_energy += a0 * a0
            acc_energy += a1 * a1
        max_lo, max_hi = _bf16_halves(acc_words)
        acc_max = _max(max_lo, max_hi)
    else:
        acc_sse = tl.full([ROWS, 16], 0.0, tl.float32)
        acc_max = tl.full([ROWS, 16], 0.0, tl.float32)
        acc_energy = tl.full([ROWS, 16], 0.0, tl.float32)
        for tile in range(TILES):
            rows = first + tile * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
            a, d = _stats_tile(x_ptr, code_ptr, table_ptr, rows, n_blocks, MASKED, ROWS, BF16)
            acc_sse += d * d
            acc_max = _max(acc_max, a)
            acc_energy += a * a
    sse = tl.reduce(tl.reduce(acc_sse, 1, _add), 0, _add)
    amax = tl.reduce(tl.reduce(acc_max, 1, _max), 0, _max)
    return sse, amax, tl.reduce(tl.reduce(acc_energy, 1, _add), 0, _add)


@triton.jit
def _stats_kernel(
    x_base,  # the first tensor (fp32 | fp16 | int16 holding bf16 bits); the others at offsets from it
    code_base,  # uint8, the first tensor's FP8 bytes
    table_base,  # fp32, the first tensor's decision table
    meta_ptr,  # [6, n_tensors] int64: element offsets of x, codes, table from the bases (x and
    # table: multiples of 8, checked by the caller); n_blocks; first program; programs (unused here)
    meta_stride,
    owner_ptr,  # [n_programs] int32: the tensor each program works on
    stats_ptr,  # [3, >= n_programs] fp32: sse, amax, energy partials, one column per program
    stats_stride,
    ROWS: tl.constexpr,  # blocks per tile
    TILES: tl.constexpr,  # tiles per program, summed in registers
    BF16: tl.constexpr,
    PAIRS: tl.constexpr,  # bf16 on sm_90: _stats_tile_pairs (inline PTX), else _stats_tile
):
    # Many tensors of one dtype in one launch (a launch per tensor cost more host time than the
    # kernel's GPU time on the small layers of a model). Each program finds its tensor by offsets
    # from the first one: offsets known to be multiples of 8 elements (ensured by the caller,
    # hinted here) keep the loads vectorized, which pointers loaded from memory would not.
    pid = tl.program_id(0)
    t = tl.load(owner_ptr + pid)
    x_ptr = x_base + tl.multiple_of(tl.load(meta_ptr + t), 8)
    code_ptr = code_base + tl.load(meta_ptr + meta_stride + t)
    table_ptr = table_base + tl.multiple_of(tl.load(meta_ptr + 2 * meta_stride + t), 8)
    n_blocks = tl.load(meta_ptr + 3 * meta_stride + t)
    first = (pid - tl.load(meta_ptr + 4 * meta_stride + t)) * (TILES * ROWS)  # block index, int64
    if first + TILES * ROWS <= n_blocks:  # a whole program's span: no masks
        sse, amax, energy = _stats_sums(
            x_ptr, code_ptr, table_ptr, first, n_blocks, False, ROWS, TILES, BF16, PAIRS
        )
    else:  # the tensor's last program
        sse, amax, energy = _stats_sums(
            x_ptr, code_ptr, table_ptr, first, n_blocks, True, ROWS, TILES, BF16, PAIRS
        )
    tl.store(stats_ptr + pid, sse)
    tl.store(stats_ptr + stats_stride + pid, amax)
    tl.store(stats_ptr + 2 * stats_stride + pid, energy)


@triton.jit
def _segment_kernel(
    part_ptr,  # [NROWS, part_stride] fp32 partial values
    part_stride,
    seg_ptr,  # [2, n_segments] int64: first column and length of each segment
    n_segments,
    out_ptr,  # [n_segments, NROWS] fp32
    longest,  # int, the longest segment
    NROWS: tl.constexpr,
    MAX_ROW: tl.constexpr,  # the row reduced by max (NaN wins); the others are summed; -1: none
    BLOCK: tl.constexpr,
):
    # One program per segment, summing in a fixed order (deterministic, unlike atomics), with no
    # host sync (torch.segment_reduce checks its lengths on the host). The loop bound is a host
    # value: the interpreter cannot loop to a bound read from memory.
    s = tl.program_id(0)
    start = tl.load(seg_ptr + s)
    n = tl.load(seg_ptr + n_segments + s)
    for r in tl.static_range(NROWS):
        acc = tl.full([BLOCK], 0.0, tl.float32)
        for i in range(0, longest, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            v = tl.load(part_ptr + r * part_stride + start + offs, mask=offs < n, other=0.0)
            if r == MAX_ROW:
                acc = _max(acc, v)
            else:
                acc += v
        if r == MAX_ROW:
            tl.store(out_ptr + s * NROWS + r, tl.reduce(acc, 0, _max))
        else:
            tl.store(out_ptr + s * NROWS + r, tl.reduce(acc, 0, _add))


def _kernel(name: str, device: torch.device):
    # CPU tensors run through Triton's interpreter, on copies built from the same source (the CUDA
    # kernels stay intact when both are used in one process).
    return globals()[name] if device.type == "cuda" else _interpret.interpreted(__name__, name)


def prepare(block_amax: torch.Tensor, global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel needs besides ``x``: ``(FP8 bytes [n_blocks] uint8, decision table [128 * 8])``.

    PyTorch, on the scales' device; ``block_amax`` with ``n_blocks`` values in any shape, ``global_amax``
    a one-element fp32 tensor. ``NVFP4Linear`` caches the pair until its scales change.
    """
    s2 = global_scale(global_amax)
    return block_code_bytes(block_amax.reshape(-1), s2), decision_table(s2).reshape(-1)


_pairs: dict[int, bool] = {}


def bf16_pairs(device: torch.device) -> bool:
    """Whether the stats pass takes bf16 pairs with inline PTX on ``device`` (``_stats_tile_pairs``):
    an NVIDIA GPU of compute capability 9.0 or newer (``set.bf16x2``). The same errors per element
    either way; the sums add them in another order, so they may differ in their last bits."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pairs:
        _pairs[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _pairs[index]


def _programs(n_blocks: int, config: dict[str, int]) -> int:
    # Not triton.cdiv: a jitted function, slow to call from Python.
    return max(1, -(-n_blocks // (config["ROWS"] * config.get("TILES", 1))))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # t itself when contiguous and 32-byte aligned, else a 32-byte aligned contiguous copy (a fresh
    # allocation is aligned; contiguous() of a contiguous but misaligned view returns the view).
    if t.is_contiguous() and t.data_ptr() % 32 == 0:
        return t
    t = t.contiguous()
    return t if t.data_ptr() % 32 == 0 else t.clone()


def stats_partials(
    xs: list[torch.Tensor],
    states: list[tuple[torch.Tensor, torch.Tensor]],
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The stats pass over many tensors of one dtype and device, in one launch (no host sync).

    Args:
        xs: the tensors (fp32/fp16/bf16, one dtype, numel a multiple of 16; validated by the caller).
        states: :func:`prepare`'s ``(codes, table)`` of each, on the same device.
        config: launch configuration (default :data:`STATS_CONFIG`).

    Returns:
        ``(partials, programs)``: fp32 ``[3, sum(programs)]`` per-program ``(sum of squared fp32
        error, max |x|, sum x^2)``, tensor ``i``'s programs in columns ``sum(programs[:i])`` on
        (:func:`segment_totals` gives per-tensor values), and the number of programs of each
        tensor. The max is NaN where a tensor holds NaN.
    """
    cfg = STATS_CONFIG if config is None else config
    x0 = xs[0]
    dtype, device, index, size = x0.dtype, x0.device, x0.get_device(), x0.element_size()
    if len(states) != len(xs):
        raise _mixed_inputs(xs, states)
    # One pass over the tensors with plain integer work on their addresses (it runs for every weight
    # of every recalibration while the GPU waits for the launch, so it keeps to a few C calls per
    # tensor and copies nothing that is already fit): the kernel reaches each tensor at its offset
    # from the first one.
    keep, ptrs, n_blocks, programs = [], [], [], []
    for x, (codes, table) in zip(xs, states, strict=True):
        if x.dtype != dtype or x.get_device() != index:
            raise _mixed_inputs(xs, states)
        xp, cp, tp = x.data_ptr(), codes.data_ptr(), table.data_ptr()
        # x and table 32-byte aligned: then every offset from the first is a multiple of 8 elements.
        if (xp | tp) % 32 or not (x.is_contiguous() and codes.is_contiguous() and table.is_contiguous()):
            x, codes, table = _aligned(x), codes.contiguous(), _aligned(table)
            xp, cp, tp = x.data_ptr(), codes.data_ptr(), table.data_ptr()
        keep.append((x, codes, table))  # copies live until the launch is queued; [0] are the bases
        ptrs.append((xp, cp, tp))
        n = x.numel() >> 4
        n_blocks.append(n)
        programs.append(_programs(n, cfg))
    (x_base, c_base, t_base), (xp0, cp0, tp0) = keep[0], ptrs[0]
    x_off = [(xp - xp0) // size for xp, _, _ in ptrs]
    c_off = [cp - cp0 for _, cp, _ in ptrs]
    t_size = t_base.element_size()
    t_off = [(tp - tp0) // t_size for _, _, tp in ptrs]
    if any(o % 8 for o in x_off + t_off):  # what the kernel's tl.multiple_of hints claim
        raise RuntimeError("stats_partials: an input offset is not a multiple of 8 elements")
    first = list(itertools.accumulate(programs[:-1], initial=0))  # each tensor's first program
    meta = on_device([x_off, c_off, t_off, n_blocks, first, programs], torch.int64, device)
    total = first[-1] + programs[-1]
    ids = torch.arange(len(xs), dtype=torch.int32, device=device)
    owner = torch.repeat_interleave(ids, meta[5], output_size=total)  # output_size: no host sync
    partials = torch.empty(3, total, dtype=torch.float32, device=device)
    with launch_device(device):
        launch(
            _kernel("_stats_kernel", device),
            (total,),
            x_base.view(torch.int16) if dtype == torch.bfloat16 else x_base,
            c_base,
            t_base,
            meta,
            meta.stride(0),
            owner,
            partials,
            partials.stride(0),
            ROWS=cfg["ROWS"],
            TILES=cfg.get("TILES", 1),
            BF16=dtype == torch.bfloat16,
            PAIRS=dtype == torch.bfloat16 and bf16_pairs(device),
            num_warps=cfg["num_warps"],
        )
    return partials, programs


def _mixed_inputs(xs: list[torch.Tensor], states: list) -> ValueError:
    return ValueError(
        "xs must be tensors of one dtype and device with one (codes, table) state each, got "
        f"{sorted({(str(x.dtype), str(x.device)) for x in xs})} and {len(states)} states for {len(xs)} tensors"
    )


def segment_totals(partials: torch.Tensor, lengths: list[int], max_row: int = -1) -> torch.Tensor:
    """Reduce ``partials`` (fp32 ``[R, >= sum(lengths)]``) over consecutive column segments of the
    given lengths: fp32 ``[len(lengths), R]``, row ``max_row`` by max (NaN wins), the others by sum.

    One launch, a fixed summation order, and no host sync (``torch.segment_reduce`` checks its
    lengths on the host, which waits for everything queued)."""
    starts = list(itertools.accumulate(lengths[:-1], initial=0))
    device = partials.device
    seg = on_device([starts, lengths], torch.int64, device)
    out = torch.empty(len(lengths), partials.shape[0], dtype=torch.float32, device=device)
    with launch_device(device):
        launch(
            _kernel("_segment_kernel", device),
            (len(lengths),),
            partials,
            partials.stride(0),
            seg,
            len(lengths),
            out,
            max(lengths),
            NROWS=partials.shape[0],
            MAX_ROW=max_row,
            BLOCK=1024,
            num_warps=4,
        )
    return out


def fake_quant_prepared(
    x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, config: dict[str, int] | None = None
) -> torch.Tensor:
    """Run the kernel on validated inputs and :func:`prepare`'s pair (all on x's device, unchecked):
    the fake-quantized tensor (contiguous, x's shape and dtype)."""
    cfg = DEFAULT_CONFIG if config is None else config
    tiles = cfg.get("TILES", 1)
    xc = x.contiguous()
    n_blocks = xc.numel() // 16
    out = torch.empty_like(xc)
    bf16 = xc.dtype == torch.bfloat16
    x_arg, out_arg = (xc.view(torch.int16), out.view(torch.int16)) if bf16 else (xc, out)
    with launch_device(xc.device):
        _kernel("_fake_quant_kernel", xc.device)[(_programs(n_blocks, cfg),)](
            x_arg,
            codes.reshape(-1),
            table.reshape(-1),
            out_arg,
            n_blocks,
            ROWS=cfg["ROWS"],
            TILES=tiles,
            BF16=bf16,
            EVEN=n_blocks % (cfg["ROWS"] * tiles) == 0,
            num_warps=cfg["num_warps"],
        )
    return out.reshape(x.shape)


def stats_prepared(
    x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, config: dict[str, int] | None = None
) -> torch.Tensor:
    """:func:`fake_quant_stats_triton` on validated inputs and :func:`prepare`'s pair: fp32 ``[3]``."""
    partials, programs = stats_partials([x], [(codes, table)], config)
    return segment_totals(partials, programs, max_row=1)[0]


@torch.library.custom_op("nvfp4_qat::fake_quant_nvfp4", mutates_args=())
def fake_quant_op(x: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """The scale preparation and the kernel as one PyTorch operator, so that ``torch.compile``
    treats them as one opaque node: Inductor would otherwise generate its own (approximate)
    divisions for the FP8 code and lose bit-exactness."""
    return fake_quant_prepared(x, *prepare(block_amax, global_amax))


@fake_quant_op.register_fake
def _(x: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_inputs(x: object, block_amax: object, global_amax: object, config: object) -> torch.Tensor:
    check_x(x, 16)  # raises unless x is a floating tensor with a last dim divisible by 16
    x = typing.cast(torch.Tensor, x)
    require_triton(x.device, "the Triton fake-quant kernel (x)")
    g = check_global_amax(global_amax, x)
    check_block_amax(block_amax, x, 16)
    _check_config(config)
    return g


def _check_config(config: object) -> None:
    if config is not None and (
        not isinstance(config, dict)
        or not {"ROWS", "num_warps"} <= set(config) <= {"ROWS", "num_warps", "TILES"}
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in config.values())
        or config["ROWS"] & (config["ROWS"] - 1)
    ):
        raise ValueError(
            f"config must be None or a dict like {DEFAULT_CONFIG} or {STATS_CONFIG} (positive ints, "
            f"ROWS a power of two), got {config!r}"
        )


def fake_quant_triton(
    x: torch.Tensor,
    block_amax: torch.Tensor,
    global_amax: torch.Tensor | float,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Fused NVFP4 fake-quant, bit-identical to :func:`~nvfp4_qat.fake_quantize_nvfp4` (block 16).

    Args:
        x: fp32/fp16/bf16 tensor on CUDA (or on the CPU with ``TRITON_INTERPRET=1``) whose last dim
            is a multiple of 16; any layout (non-contiguous input is copied first).
        block_amax: fp32 per-block amax, shape ``x.shape[:-1] + (x.shape[-1] // 16,)`` or flat.
        global_amax: per-tensor amax, scalar tensor on ``x``'s device or a number; finite, >= 0.
        config: pin a launch configuration from :data:`CONFIGS` (default :data:`DEFAULT_CONFIG`).

    Returns:
        Contiguous tensor with the shape and dtype of ``x``.

    Raises:
        TypeError, ValueError: bad tensor, dtype, shape, device, amax or config (names the argument).
    """
    g = _check_inputs(x, block_amax, global_amax, config)
    return fake_quant_prepared(x, *prepare(block_amax, g), config)


def fake_quant_stats_triton(
    x: torch.Tensor,
    block_amax: torch.Tensor,
    global_amax: torch.Tensor | float,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``(sum((q - |x|)^2), max |x|, sum(x^2))`` in fp32 from one read of ``x``: ``[3]`` tensor.

    ``q`` is the NVFP4 magnitude of each element in fp32 (:func:`~nvfp4_qat.fake_quantize_nvfp4` of
    ``x.float()``), so the first value is the error the scale sweep minimises. The sums are trees per
    program, then over programs: they agree with a PyTorch sum to fp32 rounding, not bit for bit; the max is
    exact. NaN or Inf in ``x`` makes the error NaN or Inf and the max NaN or Inf.

    Args: as :func:`fake_quant_triton` (``config`` default: :data:`STATS_CONFIG`).

    Raises:
        TypeError, ValueError: as :func:`fake_quant_triton`.
    """
    g = _check_inputs(x, block_amax, global_amax, config)
    return stats_prepared(x, *prepare(block_amax, g), config)
