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

Why the result is exact and portable:

* The FP8 rounding and the threshold search run in PyTorch (:mod:`nvfp4_qat.format`), once per
  scale change (``NVFP4Linear`` caches them) and at a sixteenth of the elements at most; the
  kernel only compares, selects and multiplies once, so there is nothing to contract into an FMA.
* bf16 is converted by bit manipulation (widening is a shift; narrowing is the usual round to
  nearest even on the fp32 bits), which is exact on the GPU and in Triton's CPU interpreter alike
  (the interpreter's own fp32 -> bf16 cast truncates).

The ``STATS`` mode (:func:`fake_quant_stats_triton`) stores, instead of the tensor, three fp32
partial sums per program: the squared NVFP4 error ``(q * e * s2 - |x|)^2`` in fp32 (the error the
scale sweep minimises), ``max |x|`` (NaN if any element is NaN) and ``sum x^2``. Recalibration gets the stale-scale error, the
new global amax and the weight energy from one read of the weight.

Tile: ``ROWS`` blocks of 16, ``TILES`` tiles per program (:data:`CONFIGS`;
``benchmarks/bench_qat_step.py --configs`` times each). Tests pin every candidate in turn. Each
block's table row arrives in one 32-byte load (``_table_row``), not eight gathers.
"""

from __future__ import annotations

import functools
import os
import typing

import torch
import triton
import triton.language as tl

from nvfp4_qat._validation import check_block_amax, check_global_amax, check_x
from nvfp4_qat.format import E2M1_VALUES, block_code_bytes, decision_table, global_scale

__all__ = [
    "CONFIGS",
    "DEFAULT_CONFIG",
    "STATS_CONFIG",
    "fake_quant_prepared",
    "fake_quant_stats_triton",
    "fake_quant_triton",
    "prepare",
    "stats_programs",
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
#: The stats pass's default: 512 blocks per program in 8 tiles, summed in registers. On an H100
#: (14336x4096 bf16, ``benchmarks/probe_stats.py``) 0.084 ms against 0.091 ms with one 128-block
#: tile per program (and 0.135 ms with the table read by eight scalar gathers per block).
STATS_CONFIG: dict[str, int] = CONFIGS[4]

_Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7 = (tl.constexpr(v) for v in E2M1_VALUES[1:])


@triton.jit
def _add(a, b):
    # tl.sum's combine; spelled out because tl.sum is itself a jitted function, which the
    # interpreter built by _interpreted_kernel() cannot call when triton was imported uninterpreted.
    return a + b


@triton.jit
def _max(a, b):
    # NaN wins (fmax would drop it): a NaN anywhere in the weight makes its max NaN, so that
    # recalibration can tell non-finite weights from the max alone (Inf is already the max).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fake_quant_kernel(
    x_ptr,  # [n_blocks * 16] fp32 | fp16 | int16 (bf16 bits), contiguous
    code_ptr,  # [n_blocks] uint8, FP8 byte of each block (format.block_code_bytes)
    table_ptr,  # [128 * 8] fp32, format.decision_table(s2)
    out_ptr,  # [n_blocks * 16] same dtype as x_ptr (STATS: unused, pass x)
    stats_ptr,  # [3, >= n_programs] fp32: sse, amax, energy partials (STATS only; else unused)
    n_blocks,  # int, number of 16-blocks
    stats_stride,  # int, row stride of stats_ptr
    ROWS: tl.constexpr,  # blocks per tile
    TILES: tl.constexpr,  # tiles per program, one after another (STATS: fewer, larger partial sums)
    BF16: tl.constexpr,  # x and out hold bf16 bit patterns as int16
    STATS: tl.constexpr,  # store the partial sums instead of the tensor
    EVEN: tl.constexpr,  # n_blocks is a multiple of ROWS * TILES: no masks (full-width vector loads)
):
    pid = tl.program_id(0)
    if STATS:  # elementwise accumulators, reduced once at the end
        acc_sse = tl.full([ROWS, 16], 0.0, tl.float32)
        acc_max = tl.full([ROWS, 16], 0.0, tl.float32)
        acc_energy = tl.full([ROWS, 16], 0.0, tl.float32)
    for tile in range(TILES):
        # [ROWS, 1]: per-block values share the tile's layout
        rows = (pid * TILES + tile) * ROWS + tl.arange(0, ROWS)[:, None]
        # The mask is a [ROWS, 1] column broadcast over the 16 elements, so the compiler still sees
        # rows of 16 contiguous elements under one predicate and keeps vector loads.
        row_ok = rows < n_blocks
        mask = None if EVEN else row_ok
        offs = rows.to(tl.int64) * 16 + tl.arange(0, 16)[None, :]  # [ROWS, 16]
        if EVEN:
            raw = tl.load(x_ptr + offs)
            code = tl.load(code_ptr + rows)
        else:  # masked rows read 0 and code 0 (infinite thresholds, scale 0): they add exactly 0
            raw = tl.load(x_ptr + offs, mask=mask, other=0)
            code = tl.load(code_ptr + rows, mask=mask, other=0)
        if BF16:
            xf = (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # exact
        else:
            xf = raw.to(tl.float32)
        xbits = xf.to(tl.uint32, bitcast=True)
        a = (xbits & 0x7FFFFFFF).to(tl.float32, bitcast=True)  # |x|, NaN stays NaN
        # Row `code` of the decision table for each block: one 32-byte load per block, split into
        # its 8 columns ([ROWS] each). Eight scalar gathers per block made the stats pass 1.6x
        # slower. (Inline: the interpreted kernel cannot call a jitted helper.)
        tbl = tl.load(table_ptr + code.to(tl.int32) * 8 + tl.arange(0, 8)[None, :])  # [ROWS, 8]
        even, odd = tl.split(tl.reshape(tbl, [ROWS, 4, 2]))  # columns 0 2 4 6 | 1 3 5 7
        e04, e26 = tl.split(tl.reshape(even, [ROWS, 2, 2]))
        o15, o37 = tl.split(tl.reshape(odd, [ROWS, 2, 2]))
        t0, t4 = tl.split(e04)
        t2, t6 = tl.split(e26)
        t1, t5 = tl.split(o15)
        t3, scale = tl.split(o37)
        q = tl.where(a >= t0[:, None], _Q1, 0.0)
        q = tl.where(a >= t1[:, None], _Q2, q)
        q = tl.where(a >= t2[:, None], _Q3, q)
        q = tl.where(a >= t3[:, None], _Q4, q)
        q = tl.where(a >= t4[:, None], _Q5, q)
        q = tl.where(a >= t5[:, None], _Q6, q)
        q = tl.where(a >= t6[:, None], _Q7, q)
        mag = q * scale[:, None]  # >= 0: q * (e * s2), the product of format.fake_quantize_unchecked
        if STATS:
            d = mag - a  # the fp32 error (NaN for a NaN weight, Inf for an Inf one)
            acc_sse += d * d
            acc_max = tl.maximum(acc_max, a, propagate_nan=tl.PropagateNan.ALL)  # as _max
            acc_energy += a * a
        else:
            out_bits = mag.to(tl.uint32, bitcast=True) | (xbits & 0x80000000)  # copysign(mag, x)
            if BF16:
                top = (out_bits + (0x7FFF + ((out_bits >> 16) & 1))) >> 16  # round to nearest even
                tl.store(out_ptr + offs, top.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
            else:
                out = out_bits.to(tl.float32, bitcast=True).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + offs, out, mask=mask)
    if STATS:
        tl.store(stats_ptr + pid, tl.reduce(tl.reduce(acc_sse, 1, _add), 0, _add))
        tl.store(stats_ptr + stats_stride + pid, tl.reduce(tl.reduce(acc_max, 1, _max), 0, _max))
        tl.store(stats_ptr + 2 * stats_stride + pid, tl.reduce(tl.reduce(acc_energy, 1, _add), 0, _add))


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _interpreted_kernel():
    # CPU tensors run through Triton's interpreter. Building it from the kernel's Python function
    # (rather than relying on TRITON_INTERPRET at import time) keeps the CUDA kernel intact when
    # both are used in one process.
    from triton.runtime.interpreter import InterpretedFunction

    fn = _fake_quant_kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return InterpretedFunction(fn)


def prepare(block_amax: torch.Tensor, global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel needs besides ``x``: ``(FP8 bytes [n_blocks] uint8, decision table [128 * 8])``.

    PyTorch, on the scales' device; ``block_amax`` with ``n_blocks`` values in any shape, ``global_amax``
    a one-element fp32 tensor. ``NVFP4Linear`` caches the pair until its scales change.
    """
    s2 = global_scale(global_amax)
    return block_code_bytes(block_amax.reshape(-1), s2), decision_table(s2).reshape(-1)


def _programs(n_blocks: int, config: dict[str, int]) -> int:
    return max(1, triton.cdiv(n_blocks, config["ROWS"] * config.get("TILES", 1)))


def stats_programs(n_blocks: int, config: dict[str, int] | None = None) -> int:
    """Programs (so partial sums per value) of one stats launch over ``n_blocks`` blocks."""
    return _programs(n_blocks, STATS_CONFIG if config is None else config)


def fake_quant_prepared(
    x: torch.Tensor,
    codes: torch.Tensor,
    table: torch.Tensor,
    config: dict[str, int] | None = None,
    stats: bool = False,
    partials: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the kernel on validated inputs and :func:`prepare`'s pair (all on x's device, unchecked).

    Returns the fake-quantized tensor (contiguous, x's shape and dtype), or with ``stats=True`` the
    fp32 ``[3]`` tensor ``(sum of squared fp32 error, max |x|, sum x^2)``. With ``partials`` (an fp32
    ``[3, stats_programs(n_blocks)]`` view to fill) the per-program sums are written there instead
    and returned unreduced, so that a caller can reduce many tensors' partials in one launch.
    """
    stats = stats or partials is not None
    cfg = (STATS_CONFIG if stats else DEFAULT_CONFIG) if config is None else config
    tiles = cfg.get("TILES", 1)
    xc = x.contiguous()
    n_blocks = xc.numel() // 16
    grid = (_programs(n_blocks, cfg),)
    out = xc if stats else torch.empty_like(xc)
    if partials is None:
        partial = torch.empty((3, grid[0]) if stats else (1,), dtype=torch.float32, device=xc.device)
    else:
        partial = partials
    bf16 = xc.dtype == torch.bfloat16
    x_arg, out_arg = (xc.view(torch.int16), out.view(torch.int16)) if bf16 else (xc, out)
    kernel = _fake_quant_kernel if xc.is_cuda else _interpreted_kernel()
    kernel[grid](
        x_arg,
        codes.reshape(-1),
        table.reshape(-1),
        out_arg,
        partial,
        n_blocks,
        partial.stride(0) if stats else 0,
        ROWS=cfg["ROWS"],
        TILES=tiles,
        BF16=bf16,
        STATS=stats,
        EVEN=n_blocks % (cfg["ROWS"] * tiles) == 0,
        num_warps=cfg["num_warps"],
    )
    if partials is not None:
        return partials
    if stats:
        return torch.stack([partial[0].sum(), partial[1].amax(), partial[2].sum()])
    return out.reshape(x.shape)


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
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreter_on())):
        raise ValueError(
            f"x must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), got a tensor on {x.device}"
        )
    g = check_global_amax(global_amax, x)
    check_block_amax(block_amax, x, 16)
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
    return g


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
    return fake_quant_prepared(x, *prepare(block_amax, g), config, stats=True)
