"""Fused NVFP4 fake-quantization forward in Triton: one read and one write per element.

Computes exactly :func:`nvfp4_qat.format.fake_quantize_unchecked` (and so
:func:`~nvfp4_qat.fake_quantize_nvfp4`), bit for bit, for fp32/fp16/bf16 tensors whose last dim is
a multiple of 16::

    u = div_rn(|x|, s2)                       # the one correctly rounded division per element
    q = E2M1 magnitude: compare u with midpoint * e (half to even), 0 where e == 0
    out = copysign(q * (e * s2), x)           # fp32, then cast to x.dtype (round to nearest even)

Why the result is exact and portable:

* The FP8 block code ``e`` is computed in PyTorch by :func:`nvfp4_qat.format.block_codes` (one
  value per 16 elements, so its cost is a sixteenth of the pass) and handed to the kernel; the
  FP8 rounding and saturation rules therefore exist in one place only.
* The midpoints and magnitudes are read from :data:`nvfp4_qat.format.E2M1_MIDPOINTS` and
  :data:`~nvfp4_qat.format.E2M1_VALUES`; the tie direction of each comparison is checked against
  that table when this module is imported.
* Arithmetic is one ``div_rn``, three multiplications and selects: no add follows a multiply, so
  there is nothing the compiler could contract into an FMA. (The ``SSE`` mode, below, adds squares;
  that sum is a reported metric, not part of the bit-exact contract.)
* bf16 is converted by bit manipulation (widening is a shift; narrowing is the usual round to
  nearest even on the fp32 bits), which is exact on the GPU and in Triton's CPU interpreter alike
  (the interpreter's own fp32 -> bf16 cast truncates).

The same kernel has an ``SSE`` mode for recalibration reports (:func:`fake_quant_sse_triton`): it
stores one fp32 partial sum of ``(fake_quant(x) - x)^2`` per program instead of the tensor, so the
weight error costs one read of the weight and no temporaries.

Tile: ``ROWS`` blocks of 16 per program. The default (128 blocks = 2048 elements, 4 warps) is the
usual size for a memory-bound elementwise kernel; it was chosen a priori, not measured, and
``benchmarks/bench_qat_step.py --configs`` prints the time of each candidate in
:data:`CONFIGS` so that the choice can be confirmed on the GPU. Tests pin every candidate in turn.
"""

from __future__ import annotations

import functools
import os
import typing

import torch
import triton
import triton.language as tl

from nvfp4_qat._validation import check_block_amax, check_global_amax, check_x
from nvfp4_qat.format import E2M1_MIDPOINTS, E2M1_VALUES, block_codes, global_scale

__all__ = ["CONFIGS", "DEFAULT_CONFIG", "fake_quant_sse_triton", "fake_quant_triton"]

#: Candidate launch configurations (blocks of 16 per program, warps).
CONFIGS: tuple[dict[str, int], ...] = (
    {"ROWS": 32, "num_warps": 2},
    {"ROWS": 64, "num_warps": 4},
    {"ROWS": 128, "num_warps": 4},
    {"ROWS": 256, "num_warps": 8},
)
DEFAULT_CONFIG: dict[str, int] = CONFIGS[2]

# The kernel's comparisons alternate u > t (ties round down) and u >= t (ties round up), starting
# with ">", exactly as the table in format.py says; refuse to import if the table ever changes.
assert tuple(t for _, t in E2M1_MIDPOINTS) == (True, False, True, False, True, False, True)
_T0, _T1, _T2, _T3, _T4, _T5, _T6 = (tl.constexpr(m) for m, _ in E2M1_MIDPOINTS)
_Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7 = (tl.constexpr(v) for v in E2M1_VALUES[1:])


@triton.jit
def _add(a, b):
    # tl.sum's combine; spelled out because tl.sum is itself a jitted function, which the
    # interpreter built by _interpreted_kernel() cannot call when triton was imported uninterpreted.
    return a + b


@triton.jit
def _fake_quant_kernel(
    x_ptr,  # [n_blocks * 16] fp32 | fp16 | int16 (bf16 bits), contiguous
    e_ptr,  # [n_blocks] fp32, FP8 code value per block
    s2_ptr,  # [] fp32, global scale global_amax / 2688
    out_ptr,  # [n_blocks * 16] same dtype as x_ptr (SSE: unused, pass x)
    sse_ptr,  # [n_programs] fp32 partial sums of squared error (SSE only; else unused)
    n_blocks,  # int, number of 16-blocks
    ROWS: tl.constexpr,  # blocks per program
    BF16: tl.constexpr,  # x and out hold bf16 bit patterns as int16
    SSE: tl.constexpr,  # store sum((fake_quant(x) - x)^2) per program instead of the tensor
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = rows < n_blocks
    offs = rows.to(tl.int64)[:, None] * 16 + tl.arange(0, 16)[None, :]  # [ROWS, 16]
    mask = row_ok[:, None] & (offs >= 0)  # [ROWS, 16]
    if BF16:
        bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        xf = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # exact widening
    else:
        xf = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + rows, mask=row_ok, other=0.0)[:, None]  # [ROWS, 1]
    s2 = tl.load(s2_ptr)
    u = tl.div_rn(tl.abs(xf), tl.broadcast_to(s2, (ROWS, 16)))  # correctly rounded, [ROWS, 16]
    q = tl.where(u > e * _T0, _Q1, 0.0)
    q = tl.where(u >= e * _T1, _Q2, q)
    q = tl.where(u > e * _T2, _Q3, q)
    q = tl.where(u >= e * _T3, _Q4, q)
    q = tl.where(u > e * _T4, _Q5, q)
    q = tl.where(u >= e * _T5, _Q6, q)
    q = tl.where(u > e * _T6, _Q7, q)
    q = tl.where(e == 0.0, 0.0, q)
    mag = q * (e * s2)  # >= 0, the same two products as format.fake_quantize_unchecked
    sign = xf.to(tl.uint32, bitcast=True) & 0x80000000
    out_bits = mag.to(tl.uint32, bitcast=True) | sign  # copysign(mag, x), NaN/-0 included
    if BF16:
        top = (out_bits + (0x7FFF + ((out_bits >> 16) & 1))) >> 16  # round to nearest even
        if SSE:
            fq = (top << 16).to(tl.float32, bitcast=True)
        else:
            tl.store(out_ptr + offs, top.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        out = out_bits.to(tl.float32, bitcast=True).to(out_ptr.dtype.element_ty)
        if SSE:
            fq = out.to(tl.float32)
        else:
            tl.store(out_ptr + offs, out, mask=mask)
    if SSE:
        # The error of the weight as forward sees it (in x's dtype), squared and summed in fp32;
        # masked lanes hold x = 0 and e = 0, so they add exactly 0.
        d = fq - xf
        tl.store(sse_ptr + pid, tl.reduce(tl.reduce(d * d, 1, _add), 0, _add))


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


def _launch(
    x: torch.Tensor,
    e: torch.Tensor,
    s2: torch.Tensor,
    config: dict[str, int] | None = None,
    sse: bool = False,
) -> torch.Tensor:
    """Run the kernel on validated inputs: ``e`` fp32 ``[n_blocks]``, ``s2`` 0-dim fp32 on x's device.

    Returns the fake-quantized tensor, or with ``sse=True`` the 0-dim fp32 sum of squared errors.
    """
    cfg = DEFAULT_CONFIG if config is None else config
    xc = x.contiguous()
    n_blocks = xc.numel() // 16
    grid = (triton.cdiv(n_blocks, cfg["ROWS"]),)
    out = xc if sse else torch.empty_like(xc)
    partial = torch.empty(grid[0] if sse else 1, dtype=torch.float32, device=xc.device)
    bf16 = xc.dtype == torch.bfloat16
    x_arg, out_arg = (xc.view(torch.int16), out.view(torch.int16)) if bf16 else (xc, out)
    kernel = _fake_quant_kernel if xc.is_cuda else _interpreted_kernel()
    kernel[grid](
        x_arg,
        e.reshape(-1).contiguous(),
        s2.reshape(()).contiguous(),
        out_arg,
        partial,
        n_blocks,
        ROWS=cfg["ROWS"],
        BF16=bf16,
        SSE=sse,
        num_warps=cfg["num_warps"],
    )
    return partial.sum() if sse else out.reshape(x.shape)


@torch.library.custom_op("nvfp4_qat::fake_quant_nvfp4", mutates_args=())
def fake_quant_op(x: torch.Tensor, e: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The kernel as a PyTorch operator, so ``torch.compile`` treats it as one opaque node."""
    return _launch(x, e, s2)


@fake_quant_op.register_fake
def _(x: torch.Tensor, e: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
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
        or set(config) != {"ROWS", "num_warps"}
        or not all(isinstance(v, int) and v > 0 for v in config.values())
        or config["ROWS"] & (config["ROWS"] - 1)
    ):
        raise ValueError(
            f"config must be None or a dict like {DEFAULT_CONFIG} (ROWS a power of two), got {config!r}"
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
    s2 = global_scale(g)
    e = block_codes(block_amax.reshape(-1), s2)  # [n_blocks] fp32, format.py's FP8 rounding
    return _launch(x, e, s2, config)


def fake_quant_sse_triton(
    x: torch.Tensor,
    block_amax: torch.Tensor,
    global_amax: torch.Tensor | float,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Sum of squared NVFP4 fake-quant error, ``sum((fake_quantize_nvfp4(x, ...) - x) ** 2)``.

    The fake-quantized values are exactly those of :func:`fake_quant_triton` (in ``x``'s dtype);
    the differences are squared and summed in fp32 inside the kernel (a tree per tile, then the
    tiles), so the sum agrees with a PyTorch sum to fp32 rounding, not bit for bit. One read per
    element, no temporaries: this is what :func:`nvfp4_qat.recalibrate` reports.

    Args: as :func:`fake_quant_triton`.

    Returns:
        0-dim fp32 tensor on ``x``'s device (NaN or Inf when ``x`` holds such values).

    Raises:
        TypeError, ValueError: as :func:`fake_quant_triton`.
    """
    g = _check_inputs(x, block_amax, global_amax, config)
    s2 = global_scale(g)
    return _launch(x, block_codes(block_amax.reshape(-1), s2), s2, config, sse=True)
