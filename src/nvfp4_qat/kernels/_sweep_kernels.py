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
  ``2v`` is >= its error at ``v`` and the (monotone) tree sum follows; the smaller index wins the
  ties. In the FP8 normal range ``v[k + 8] = 2 * v[k]``, so everything from ``k0 + 8`` up is
  dominated by a window code. Two things can break the per-element step, and flag the block:
  ``v[k0]`` subnormal (halving a candidate does not give a candidate), and an element whose ``u``
  lies 1..ZONE ulps from a number of at most 7 significant bits (every ``midpoint * v`` is one):
  there the float32 decision and the float32 error may disagree by an ulp. Beyond 2 ulps they
  cannot (see ``tests/test_sweep_triton.py`` for the checks of these claims).
* Below: every code under ``k0`` saturates, and the max element alone contributes
  ``(m - 6 * s)^2``, which grows as ``s`` falls. If that lower bound at ``lo - 1`` does not
  strictly exceed the window's best loss, the block is flagged.

Flagged blocks (and every block when ``s2 < 2**-100``, where products may turn subnormal) are
appended to a work list and swept exhaustively by ``_sweep_worklist_kernel``, a persistent kernel
that reads the count on the device (no host sync).

CPU tensors run under Triton's interpreter: :func:`interpreted` rebuilds a kernel and its helpers
as interpreted functions from the same source, so the compiled CUDA kernels stay intact in the same
process. (That is also why no jitted library function such as ``tl.sum`` or ``tl.max`` is used:
an interpreted kernel cannot call one when triton was imported without ``TRITON_INTERPRET``.)
"""

from __future__ import annotations

import functools
import types

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelInterface

from nvfp4_qat.format import E2M1_MIDPOINTS, E2M1_VALUES, FP4_MAX, GLOBAL_SCALE_DIVISOR

# The E2M1 rule, imported from the format module (never restated): midpoint, ties-down flag and
# the magnitude reached by passing it, one triple per midpoint, ascending.
(_M1, _T1), (_M2, _T2), (_M3, _T3), (_M4, _T4), (_M5, _T5), (_M6, _T6), (_M7, _T7) = (
    (tl.constexpr(m), tl.constexpr(t)) for m, t in E2M1_MIDPOINTS
)
_Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7 = (tl.constexpr(q) for q in E2M1_VALUES[1:])
_QMAX = tl.constexpr(FP4_MAX)
_DIVISOR = tl.constexpr(GLOBAL_SCALE_DIVISOR)
# Below this s2, v * s2 or q * v * s2 can be subnormal and the pruning proof no longer holds.
_TINY_S2 = tl.constexpr(2.0**-100)
# An element whose u is 1..ZONE ulps from a number with <= 7 significant bits (low 17 mantissa
# bits near 0 or near 2**17) may break the doubling argument; 3 ulps are provably safe.
_ZONE = tl.constexpr(8)
_LOW_MASK = tl.constexpr(2**17 - 1)

# (BLOCK_B, num_warps) per kernel, keyed on the block count. Timings: see BENCHMARKS.md.
EXHAUSTIVE_CONFIGS = [
    triton.Config({"BLOCK_B": 32}, num_warps=2),
    triton.Config({"BLOCK_B": 64}, num_warps=4),
    triton.Config({"BLOCK_B": 128}, num_warps=4),
    triton.Config({"BLOCK_B": 128}, num_warps=8),
]
PRUNED_CONFIGS = [
    triton.Config({"BLOCK_B": 32}, num_warps=2),
    triton.Config({"BLOCK_B": 64}, num_warps=4),
    triton.Config({"BLOCK_B": 128}, num_warps=4),
    triton.Config({"BLOCK_B": 128}, num_warps=8),
]
#: Tile of the second (work-list) pass; not autotuned, its length is only known on the device.
WORKLIST_CONFIG = triton.Config({"BLOCK_B": 32}, num_warps=2)


@triton.jit
def _block_loss(
    absw,  # [B, 16] fp32, |w|
    u,  # [B, 16] fp32, |w| / s2 (correctly rounded)
    v,  # [B, 1] or scalar fp32, FP8 code value
    s2,  # scalar fp32
    B: tl.constexpr,
):
    # Squared error of each block at code v, summed as the reference does. -> [B] fp32
    # The 7 midpoint steps, written out (a nested jit call per step is slow in the interpreter):
    # passing MID * v (exact in fp32) lifts the magnitude to Q; at a tie it stays down when the
    # format's flag T says so. Later steps overwrite earlier ones (u passes them in order).
    sv = v * s2
    dq = tl.full([B, 16], 0.0, tl.float32)
    dq = tl.where((u > _M1 * v) if _T1 else (u >= _M1 * v), _Q1 * sv, dq)
    dq = tl.where((u > _M2 * v) if _T2 else (u >= _M2 * v), _Q2 * sv, dq)
    dq = tl.where((u > _M3 * v) if _T3 else (u >= _M3 * v), _Q3 * sv, dq)
    dq = tl.where((u > _M4 * v) if _T4 else (u >= _M4 * v), _Q4 * sv, dq)
    dq = tl.where((u > _M5 * v) if _T5 else (u >= _M5 * v), _Q5 * sv, dq)
    dq = tl.where((u > _M6 * v) if _T6 else (u >= _M6 * v), _Q6 * sv, dq)
    dq = tl.where((u > _M7 * v) if _T7 else (u >= _M7 * v), _Q7 * sv, dq)
    d = absw - dq
    sq = d * d
    # Pairwise tree over adjacent pairs (16 -> 8 -> 4 -> 2 -> 1), as the reference sums: each
    # level splits off the even and odd members of every pair and adds them.
    a, b = tl.split(tl.reshape(sq, [B, 8, 2]))
    a, b = tl.split(tl.reshape(a + b, [B, 4, 2]))
    a, b = tl.split(tl.reshape(a + b, [B, 2, 2]))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def _max16(x, B: tl.constexpr):
    # Max over the 16 elements of each block, [B, 16] -> [B] (a split tree: no jitted reduction).
    a, b = tl.split(tl.reshape(x, [B, 8, 2]))
    a, b = tl.split(tl.reshape(tl.maximum(a, b), [B, 4, 2]))
    a, b = tl.split(tl.reshape(tl.maximum(a, b), [B, 2, 2]))
    a, b = tl.split(tl.maximum(a, b))
    return tl.maximum(a, b)


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
    # Exhaustive running argmin over all codes, ascending, strict <. -> [B] int32
    best_loss = tl.full([B], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([B], dtype=tl.int32)
    for k in range(NUM_CANDIDATES):
        v = tl.load(values_ptr + k)
        loss = _block_loss(absw, u, v, s2, B)
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, k, best_idx)
    return best_idx


@triton.autotune(configs=EXHAUSTIVE_CONFIGS, key=["n_blocks"])
@triton.jit
def _sweep_exhaustive_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values (format.fp8_code_values)
    cands_ptr,  # [126] fp32, code values / 448 (format.fp8_scale_candidates)
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax
    n_blocks,
    NUM_CANDIDATES: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < n_blocks
    absw, u, s2, g = _load_blocks(x_ptr, rows, mask, g_ptr, BLOCK_B)
    best = _argmin_all(absw, u, s2, values_ptr, NUM_CANDIDATES, BLOCK_B)
    tl.store(out_ptr + rows, tl.load(cands_ptr + best) * g, mask=mask)


@triton.autotune(configs=PRUNED_CONFIGS, key=["n_blocks"], reset_to_zero=["count_ptr"])
@triton.jit
def _sweep_pruned_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values
    cands_ptr,  # [126] fp32, code values / 448
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax (flagged blocks are left to the second pass)
    work_ptr,  # [n_blocks] int32, indices of flagged blocks
    count_ptr,  # [1] int32, number of flagged blocks (zeroed by the caller)
    n_blocks,
    NUM_CANDIDATES: tl.constexpr,
    FIRST_DOUBLING: tl.constexpr,  # first k from which v[k + 8] == 2 * v[k] (normal codes)
    N_BELOW: tl.constexpr,  # codes scored below k0
    BLOCK_B: tl.constexpr,
):
    N_WINDOW: tl.constexpr = N_BELOW + 8
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < n_blocks
    absw, u, s2, g = _load_blocks(x_ptr, rows, mask, g_ptr, BLOCK_B)
    m = _max16(absw, BLOCK_B)  # [B]
    u_max = _max16(u, BLOCK_B)  # = fl(m / s2): rounding is monotone

    # k0 = first code with 6 * v >= u_max (126 if none): binary search over the table.
    lo = tl.zeros([BLOCK_B], dtype=tl.int32)
    hi = tl.full([BLOCK_B], NUM_CANDIDATES, dtype=tl.int32)
    for _ in tl.static_range(7):  # 2**7 > 126
        mid = (lo + hi) // 2
        ok = _QMAX * tl.load(values_ptr + tl.minimum(mid, NUM_CANDIDATES - 1)) >= u_max
        active = lo < hi
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    k0 = lo

    # Score the window [start, start + N_WINDOW), which always covers [k0 - N_BELOW, k0 + 7].
    start = tl.minimum(tl.maximum(k0 - N_BELOW, 0), NUM_CANDIDATES - N_WINDOW)
    best_loss = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
    best_idx = start
    for i in tl.static_range(N_WINDOW):
        v = tl.load(values_ptr + start + i)
        loss = _block_loss(absw, u, v[:, None], s2, BLOCK_B)
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, start + i, best_idx)

    # Below the window: the max element's saturation error bounds every smaller code's loss.
    v_below = tl.load(values_ptr + tl.maximum(start - 1, 0))
    gap = tl.maximum(m - _QMAX * (v_below * s2), 0.0)
    bound_fails = (start > 0) & ~(gap * gap > best_loss)

    # Above the window: the doubling argument needs a normal v[k0] and no element near a
    # midpoint of some code (zero blocks score 0 everywhere and need neither).
    v_k0 = tl.load(values_ptr + tl.minimum(k0, NUM_CANDIDATES - 1))
    low = u.to(tl.int32, bitcast=True) & _LOW_MASK
    near = ((low >= 1) & (low <= _ZONE)) | (low >= _LOW_MASK + 1 - _ZONE)
    near = near & (u >= 0.125 * v_k0[:, None])  # smaller elements round to 0 at every code >= v[k0]
    zone = _max16(near.to(tl.int32), BLOCK_B) > 0
    flag = bound_fails | ((k0 < FIRST_DOUBLING) & (m > 0)) | zone | (tl.full([BLOCK_B], 0.0, tl.float32) + s2 < _TINY_S2)
    flag = flag & mask

    tl.store(out_ptr + rows, tl.load(cands_ptr + best_idx) * g, mask=mask & ~flag)
    # One atomic per flagged block (a few per thousand): each gets its own slot in the list.
    slot = tl.atomic_add(count_ptr + tl.zeros([BLOCK_B], dtype=tl.int32), 1, mask=flag)
    tl.store(work_ptr + slot, rows.to(tl.int32), mask=flag)


@triton.jit
def _sweep_worklist_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values
    cands_ptr,  # [126] fp32, code values / 448
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax
    work_ptr,  # [n_blocks] int32, block indices to sweep exhaustively
    count_ptr,  # [1] int32, how many entries of work_ptr are valid
    NUM_CANDIDATES: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # Persistent: the work list's length is only known on the device.
    count = tl.load(count_ptr)
    n_tiles = (count + BLOCK_B - 1) // BLOCK_B
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        slots = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        mask = slots < count
        rows = tl.load(work_ptr + slots, mask=mask, other=0).to(tl.int64)
        absw, u, s2, g = _load_blocks(x_ptr, rows, mask, g_ptr, BLOCK_B)
        best = _argmin_all(absw, u, s2, values_ptr, NUM_CANDIDATES, BLOCK_B)
        tl.store(out_ptr + rows, tl.load(cands_ptr + best) * g, mask=mask)


@functools.cache
def _interpreted_namespace() -> dict:
    # A copy of this module's globals in which every jitted function is an interpreted one that
    # resolves its callees in the copy (so nested helpers are interpreted too).
    ns = dict(globals())
    for name, obj in list(ns.items()):
        if isinstance(obj, KernelInterface):
            raw = obj
            while not isinstance(raw, types.FunctionType):
                raw = raw.fn  # Autotuner -> JITFunction / InterpretedFunction -> function
            copy = types.FunctionType(raw.__code__, ns, raw.__name__, raw.__defaults__, raw.__closure__)
            ns[name] = InterpretedFunction(copy)
    return ns


def interpreted(name: str) -> InterpretedFunction:
    """The kernel ``name`` of this module, built for Triton's CPU interpreter."""
    return _interpreted_namespace()[name]
