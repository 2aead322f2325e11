"""Dynamic NVFP4 fake-quant of activations (the W4A4 input path) in two reads of ``x`` and one write.

Computes exactly what :class:`~nvfp4_qat.NVFP4Linear` computed with ``quantize_activations`` before
this module existed, bit for bit::

    cur   = x.abs().amax().float()                                  # pass 1: _amax_kernel
    block = x.abs().reshape(-1, 16).amax(-1).float()                # pass 2, in registers
    out   = format.fake_quantize_unchecked(x, block, global_amax)   # pass 2: _act_quant_kernel

``global_amax`` is the caller's (the layer's running ``input_amax``, or ``cur`` in an uncalibrated
eval forward). The first pass writes one fp32 maximum per program (NaN if the program saw a NaN),
reduced by ``torch.amax``, which also propagates NaN: a batch holding NaN gets a NaN ``cur`` and the
layer skips it. The second pass is the fused kernel of :mod:`nvfp4_qat.kernels.fake_quant` with the
block amax taken from the tile it has just loaded, so nothing of size ``n_blocks`` is written or read.

The FP8 byte of each block, ``format.block_code_bytes(block, s2)``, is found without dividing:
``block -> byte`` is monotone (a chain of correctly rounded divisions, a clamp and a round-to-nearest
cast), so it is the number of thresholds ``T[c]`` (``c = 1..126``) that ``block`` reaches, with
``T[c]`` the smallest fp32 whose byte is at least ``c``. :func:`code_thresholds` finds each ``T[c]``
in PyTorch by evaluating ``block_code_bytes`` itself on a window of floats around
``6 * midpoint_c * s2`` (as :func:`~nvfp4_qat.format.decision_table` does for the E2M1 decision;
``tests/test_act_quant.py`` checks that the window brackets every boundary across the fp32 range),
and the kernel runs a 7-step binary search per block. A NaN block amax reaches no threshold (byte 0,
as ``nan_to_num`` makes it); an ``s2`` that is 0, Inf or NaN makes every byte 0, as the format does.
"""

from __future__ import annotations

import typing

import torch
import triton
import triton.language as tl

from nvfp4_qat._backend import launch_device, require_triton
from nvfp4_qat._validation import check_global_amax, check_x
from nvfp4_qat.format import BLOCK_SIZE, block_code_bytes, decision_table, fp8_code_values, global_scale
from nvfp4_qat.kernels import _interpret
from nvfp4_qat.kernels.fake_quant import (
    DEFAULT_CONFIG,
    _check_config,
    _max,
    _programs,
    _quantize_store,
    _widen,
)

__all__ = [
    "AMAX_CONFIG",
    "act_amax_triton",
    "act_fake_quant_triton",
    "act_quant_prepared",
    "code_thresholds",
    "input_amax",
    "prepare_dynamic",
]

#: The max pass: 512 blocks (8192 elements) per program in 8 tiles, reduced in registers.
AMAX_CONFIG: dict[str, int] = {"ROWS": 64, "num_warps": 4, "TILES": 8}
#: Search window of :func:`code_thresholds`, in fp32 ulps either side of ``6 * midpoint * s2``. The
#: two rounded divisions move the boundary by a few ulps at most (most where ``block / 6`` is
#: subnormal: half an ulp of ``block / 6`` is up to 3 ulps of ``block``); the tests check the bracket.
_CODE_WINDOW = 8
_INF_BITS = 0x7F800000

_CODE_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _code_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # 6 * (the rounding midpoint below FP8 byte c), exact in fp32 (at most 7 significant bits), and
    # the bytes c = 1..126 (uint8), made once per device (see format._table_constants for why).
    if device not in _CODE_CONSTANTS:
        v = fp8_code_values()  # bytes 1..126
        below = torch.cat([torch.zeros(1), v[:-1]])
        six_mid = (below + v) / 2 * 6
        c = torch.arange(1, 127, dtype=torch.uint8)
        _CODE_CONSTANTS[device] = (six_mid.to(device), c.to(device))
    return _CODE_CONSTANTS[device]


def code_thresholds(s2: torch.Tensor) -> torch.Tensor:
    """``[128]`` fp32 on ``s2``'s device: entry ``c`` (1..126) is the smallest fp32 ``b >= 0`` with
    ``format.block_code_bytes(b, s2) >= c``; entry 0 is 0 (never read) and entry 127 NaN (never
    reached). So ``block_code_bytes(b, s2)`` is the number of entries ``1..126`` with ``b >= T[c]``,
    for every ``b`` (NaN reaches none). Entries that no ``b`` reaches (``s2`` 0, Inf or NaN) are NaN.
    """
    s2 = s2.reshape(()).to(torch.float32)
    six_mid, c = _code_constants(s2.device)
    guess = (six_mid * s2).view(torch.int32)  # [126]; non-negative floats order like their bits
    steps = torch.arange(-_CODE_WINDOW, _CODE_WINDOW + 1, dtype=torch.int32, device=s2.device)
    cand = (guess[:, None] + steps).clamp(min=0, max=_INF_BITS).view(torch.float32)  # [126, 17]
    passed = block_code_bytes(cand, s2) >= c[:, None]  # the format's own rounding, evaluated
    first = passed.to(torch.int8).argmax(dim=-1, keepdim=True)  # first float that passes
    thr = cand.gather(-1, first).squeeze(-1)
    thr = torch.where(passed.any(dim=-1), thr, torch.nan)  # unreachable code: never passed
    zero = torch.zeros(1, dtype=torch.float32, device=s2.device)
    return torch.cat([zero, thr, torch.full_like(zero, torch.nan)])


def prepare_dynamic(global_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`act_quant_prepared` needs: ``(code_thresholds(s2) [128], decision_table(s2) [1024])``."""
    s2 = global_scale(global_amax)
    return code_thresholds(s2), decision_table(s2).reshape(-1)


@triton.jit
def _amax_kernel(
    x_ptr,  # [n_blocks * 16] fp32 | fp16 | int16 (bf16 bits), contiguous
    part_ptr,  # [programs] fp32: max |x| over each program's span, NaN if it holds a NaN
    n_blocks,  # int, number of 16-blocks
    ROWS: tl.constexpr,  # blocks per tile
    TILES: tl.constexpr,  # tiles per program, reduced in registers
    BF16: tl.constexpr,  # x holds bf16 bit patterns as int16
    EVEN: tl.constexpr,  # n_blocks is a multiple of ROWS * TILES: no masks
):
    acc = tl.full([ROWS, 16], 0.0, tl.float32)
    for tile in range(TILES):
        rows = (tl.program_id(0) * TILES + tile) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        offs = rows.to(tl.int64) * 16 + tl.arange(0, 16)[None, :]  # [ROWS, 16]
        if EVEN:
            raw = tl.load(x_ptr + offs)
        else:  # masked elements read 0, which never raises a max of |x|
            raw = tl.load(x_ptr + offs, mask=rows < n_blocks, other=0)
        a = (_widen(raw, BF16).to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.float32, bitcast=True)
        acc = _max(acc, a)  # NaN wins: the batch's max must say NaN
    tl.store(part_ptr + tl.program_id(0), tl.reduce(tl.reduce(acc, 1, _max), 0, _max))


@triton.jit
def _block_code(b, thr_ptr):
    # FP8 byte [ROWS, 1] int32 of block amax b [ROWS, 1]: the number of thresholds T[1..126] that b
    # reaches, by binary search (T is non-decreasing; T[127] is NaN, so index 127 never passes).
    code = tl.full(b.shape, 0, tl.int32)  # not tl.zeros: a jitted helper, not callable interpreted
    for k in tl.static_range(7):
        t = tl.load(thr_ptr + code + (64 >> k))
        code = tl.where(b >= t, code + (64 >> k), code)  # NaN b or NaN t: no step
    return code


@triton.jit
def _act_quant_kernel(
    x_ptr,  # [n_blocks * 16] fp32 | fp16 | int16 (bf16 bits), contiguous
    thr_ptr,  # [128] fp32, code_thresholds(s2)
    table_ptr,  # [128 * 8] fp32, format.decision_table(s2)
    out_ptr,  # [n_blocks * 16] same dtype as x_ptr
    n_blocks,  # int, number of 16-blocks
    ROWS: tl.constexpr,  # blocks per tile
    TILES: tl.constexpr,  # tiles per program, one after another
    BF16: tl.constexpr,  # x and out hold bf16 bit patterns as int16
    EVEN: tl.constexpr,  # n_blocks is a multiple of ROWS * TILES: no masks
):
    for tile in range(TILES):
        rows = (tl.program_id(0) * TILES + tile) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        offs = rows.to(tl.int64) * 16 + tl.arange(0, 16)[None, :]  # [ROWS, 16]
        if EVEN:
            raw = tl.load(x_ptr + offs)
        else:  # masked rows read 0: block amax 0, byte 0, nothing stored
            raw = tl.load(x_ptr + offs, mask=rows < n_blocks, other=0)
        xbits = _widen(raw, BF16).to(tl.uint32, bitcast=True)
        a = (xbits & 0x7FFFFFFF).to(tl.float32, bitcast=True)  # |x|, NaN stays NaN
        b = tl.reduce(a, 1, _max)[:, None]  # the block amax, NaN if the block holds a NaN
        code = _block_code(b, thr_ptr)
        _quantize_store(out_ptr, offs, rows, n_blocks, a, xbits, code, table_ptr, ROWS, BF16, EVEN)


def _kernel(name: str, device: torch.device):
    # CPU tensors run through Triton's interpreter (see fake_quant._kernel).
    return globals()[name] if device.type == "cuda" else _interpret.interpreted(__name__, name)


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    # x as a contiguous launch argument (bf16 as its int16 bits) and whether it is bf16.
    xc = x.contiguous()
    bf16 = xc.dtype == torch.bfloat16
    return (xc.view(torch.int16) if bf16 else xc), bf16


def input_amax(x: torch.Tensor) -> torch.Tensor:
    """``x.abs().amax()`` as a 0-dim fp32 tensor (NaN if ``x`` holds a NaN; 0 for an empty ``x``),
    from one read of ``x`` and no host sync. ``x``: fp32/fp16/bf16, numel a multiple of 16, unchecked."""
    xf, bf16 = _flat(x)
    n_blocks = xf.numel() // 16
    cfg = AMAX_CONFIG
    span = cfg["ROWS"] * cfg["TILES"]
    partials = torch.empty(_programs(n_blocks, cfg), dtype=torch.float32, device=x.device)
    with launch_device(x.device):
        _kernel("_amax_kernel", x.device)[(partials.numel(),)](
            xf,
            partials,
            n_blocks,
            ROWS=cfg["ROWS"],
            TILES=cfg["TILES"],
            BF16=bf16,
            EVEN=n_blocks % span == 0 and n_blocks > 0,
            num_warps=cfg["num_warps"],
        )
    return partials.amax()  # propagates NaN


def act_quant_prepared(
    x: torch.Tensor, thresholds: torch.Tensor, table: torch.Tensor, config: dict[str, int] | None = None
) -> torch.Tensor:
    """The second pass on validated inputs and :func:`prepare_dynamic`'s pair (on x's device,
    unchecked): ``fake_quantize_unchecked(x, x's block amax, global_amax)``, contiguous."""
    cfg = DEFAULT_CONFIG if config is None else config
    tiles = cfg.get("TILES", 1)
    xf, bf16 = _flat(x)
    n_blocks = xf.numel() // 16
    out = torch.empty_like(xf)
    with launch_device(x.device):
        _kernel("_act_quant_kernel", x.device)[(_programs(n_blocks, cfg),)](
            xf,
            thresholds,
            table,
            out,
            n_blocks,
            ROWS=cfg["ROWS"],
            TILES=tiles,
            BF16=bf16,
            EVEN=n_blocks % (cfg["ROWS"] * tiles) == 0 and n_blocks > 0,
            num_warps=cfg["num_warps"],
        )
    return (out.view(torch.bfloat16) if bf16 else out).reshape(x.shape)


@torch.library.custom_op("nvfp4_qat::act_amax", mutates_args=())
def act_amax_op(x: torch.Tensor) -> torch.Tensor:
    """:func:`input_amax` as an opaque operator (``torch.compile`` keeps the kernel)."""
    return input_amax(x)


@act_amax_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("nvfp4_qat::act_fake_quant", mutates_args=())
def act_fake_quant_op(x: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    """The threshold preparation and the second pass as one opaque operator: Inductor would otherwise
    generate its own (approximate) divisions for the scales and lose bit-exactness."""
    return act_quant_prepared(x, *prepare_dynamic(global_amax))


@act_fake_quant_op.register_fake
def _(x: torch.Tensor, global_amax: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check(x: object) -> torch.Tensor:
    check_x(x, BLOCK_SIZE)  # a floating tensor whose last dim is a multiple of 16
    x = typing.cast(torch.Tensor, x)
    require_triton(x.device, "the Triton activation kernel (x)")
    return x


def act_amax_triton(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` as a 0-dim fp32 tensor on ``x``'s device (NaN if ``x`` holds a NaN), one read.

    Raises:
        TypeError, ValueError: ``x`` is not an fp32/fp16/bf16 CUDA tensor (or CPU with
            ``TRITON_INTERPRET=1``) whose last dim is a multiple of 16.
    """
    return input_amax(_check(x))


def act_fake_quant_triton(
    x: torch.Tensor, global_amax: torch.Tensor | float, *, config: dict[str, int] | None = None
) -> torch.Tensor:
    """NVFP4 fake-quant of ``x`` with its own per-block amax (dynamic scales, as activations use),
    bit-identical to ``fake_quantize_nvfp4(x, x.abs().reshape(-1, 16).amax(-1).float(), global_amax)``.

    Args:
        x: fp32/fp16/bf16 tensor on CUDA (or on the CPU with ``TRITON_INTERPRET=1``) whose last dim is
            a multiple of 16; any layout (non-contiguous input is copied first).
        global_amax: per-tensor amax, scalar tensor on ``x``'s device or a number; finite, >= 0.
        config: launch configuration, as for :func:`~nvfp4_qat.kernels.fake_quant.fake_quant_triton`.

    Returns:
        Contiguous tensor with the shape and dtype of ``x``.

    Raises:
        TypeError, ValueError: bad tensor, dtype, shape, device or amax (names the argument).
    """
    g = check_global_amax(global_amax, _check(x))
    _check_config(config)
    return act_quant_prepared(x, *prepare_dynamic(g), config)
