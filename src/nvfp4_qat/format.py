"""NVFP4 numerics: the single source of truth for the format.

NVFP4 stores a tensor as 4-bit E2M1 values in blocks of 16 consecutive elements (along the last
dim), each block with an FP8 E4M3 scale, plus one FP32 scale per tensor. Everything else in
this package (the reference sweep, the Triton kernels, the QAT modules, the exporter) imports its
constants and rules from here.

Definition, to the last rounding step (all arithmetic in fp32, every division correctly rounded):

* ``s2 = global_amax / 2688``  (2688 = 6 * 448), the per-tensor scale.
* ``e = fp8_e4m3fn((block_amax / 6) / s2)``: the per-block FP8 code, rounded to nearest even,
  saturating at 448, FP8 subnormals allowed. The block scale is ``e * s2``.
* ``u = |x| / s2``: one correctly rounded division per element.
* The E2M1 magnitude ``q`` is chosen by comparing ``u`` with each E2M1 midpoint times ``e``
  (round half to even at the midpoints)::

      u <= 0.25e -> 0,  u < 0.75e -> 0.5,  u <= 1.25e -> 1,  u < 1.75e -> 1.5,
      u <= 2.5e  -> 2,  u < 3.5e  -> 3,    u <= 5e    -> 4,  else 6

  The products ``midpoint * e`` are exact in fp32 (a 3-bit midpoint times a 4-bit FP8 code), so
  the only rounding before the decision is the one in ``u``. ``e == 0`` gives 0.
* Output ``sign(x) * (q * (e * s2))`` in fp32, cast back to ``x.dtype``.
* A non-finite ``x`` (NaN, +-Inf) gives NaN, whatever the scales: a NaN weight or activation must
  never come out finite (the comparisons above would map NaN to 0 and Inf to ``6 * e * s2``) and
  so hide a diverged run behind a finite loss. A NaN's sign and payload are not part of the format
  (PyTorch's own CPU cast to bf16 turns every NaN into 0xFFFF); implementations agree on where NaN is.

Why this form and not the textbook ``q(|x| / (e * s2))``: the deployed checkpoint stores ``e`` and
``s2`` and dequantizes to ``q * e * s2``, and the scale sweep can then try 126 codes without a
division per candidate (``u`` is computed once). The two forms agree except when ``|x| / s2`` lies
within half an fp32 ulp of a midpoint times ``e``: there the textbook form rounds the quotient
``|x| / (e * s2)`` onto (or off) the midpoint, while this form decides on ``u`` exactly as
rounded. Such elements are rare (well under 0.1% of a random weight) and always at a midpoint.

CUDA trap: PyTorch divides a CUDA tensor by a Python scalar (or a 0-dim CPU tensor) by
multiplying with the reciprocal, which is not correctly rounded. Every division here is by a
tensor on the same device, so CPU and CUDA results are bit-identical.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "E2M1_MIDPOINTS",
    "FP4_MAX",
    "FP8_MAX",
    "GLOBAL_SCALE_DIVISOR",
    "fp8_scale_candidates",
    "fp8_code_values",
    "fake_quantize_nvfp4",
    "block_code_bytes",
    "decision_table",
]

#: The 8 non-negative E2M1 magnitudes, ascending.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: The 7 midpoints between consecutive magnitudes, each with the comparison that rounds half to
#: even: ``True`` means "u <= midpoint*e rounds down" (the lower neighbour is even), ``False``
#: means "u < midpoint*e rounds down" (the upper neighbour is even).
E2M1_MIDPOINTS: tuple[tuple[float, bool], ...] = (
    (0.25, True),
    (0.75, False),
    (1.25, True),
    (1.75, False),
    (2.5, True),
    (3.5, False),
    (5.0, True),
)
#: Elements per block (along the last dim): NVFP4 fixes it at 16; the kernels and the export
#: support nothing else. The one source of this number.
BLOCK_SIZE = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
#: ``s2 = global_amax / GLOBAL_SCALE_DIVISOR``.
GLOBAL_SCALE_DIVISOR = FP4_MAX * FP8_MAX  # 2688
NUM_CANDIDATES = 126


def fp8_code_values(device: torch.device | str | None = None) -> torch.Tensor:
    """The 126 positive finite ``float8_e4m3fn`` values (2^-9 .. 448), ascending, as fp32.

    Built from the bit patterns 0x01..0x7E (0x7F is NaN), so the set is exact by construction.
    """
    codes = torch.arange(1, NUM_CANDIDATES + 1, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn).to(torch.float32).to(device)


def fp8_scale_candidates(device: torch.device | str | None = None) -> torch.Tensor:
    """The 126 positive finite FP8 E4M3 values divided by 448, ascending.

    ``candidates[i] * global_amax`` is the ``block_amax`` that selects FP8 code ``i`` under
    :func:`fake_quantize_nvfp4`. The division runs on the CPU (correctly rounded) and the result
    is moved, so every device gets the same bits.

    Args:
        device: where to put the result (default: CPU).

    Returns:
        Tensor of shape ``[126]``, float32, from ``2**-9 / 448`` to ``1.0``.
    """
    values = fp8_code_values()
    return (values / torch.tensor(FP8_MAX)).to(device)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    # A 0-dim fp32 tensor on ``like``'s device: dividing by it is a true division on CUDA too.
    return torch.full((), value, dtype=torch.float32, device=like.device)


def global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    """``s2 = global_amax / 2688`` in fp32 (0-dim tensor on ``global_amax``'s device)."""
    g = global_amax.reshape(()).to(torch.float32)
    return g / _const(GLOBAL_SCALE_DIVISOR, g)


def block_codes(block_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The per-block FP8 code ``e = fp8_e4m3fn((block_amax / 6) / s2)`` as fp32 values.

    Saturates at 448 (clamped before the cast, since PyTorch versions differ on overflow) and
    gives 0 when ``s2 == 0`` (an all-zero tensor), never NaN.
    """
    b = block_amax.to(torch.float32)
    ratio = (b / _const(FP4_MAX, b)) / s2
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=FP8_MAX)  # 0/0 and b/0 when s2 == 0
    ratio = torch.where(s2 > 0, ratio, torch.zeros_like(ratio)).clamp(min=0.0, max=FP8_MAX)
    return ratio.to(torch.float8_e4m3fn).to(torch.float32)


def block_code_bytes(block_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The FP8 block codes of :func:`block_codes` as their ``float8_e4m3fn`` bytes (``uint8``, 0..126).

    Exact: every value :func:`block_codes` returns is an FP8 value. Byte ``c`` selects row ``c`` of
    :func:`decision_table`; the sweep kernels return the same bytes for the codes they choose.
    """
    return block_codes(block_amax, s2).to(torch.float8_e4m3fn).view(torch.uint8)


#: Per-element search window of :func:`decision_table`, in fp32 ulps around ``midpoint * e * s2``.
_WINDOW = 4


_TABLE_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _table_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The code value e of each FP8 byte ([128], 0 for the NaN byte), e * midpoint ([128, 7], exact)
    # and the ties-down flags ([7]), made once per device: a host-to-GPU copy per call would either
    # wait for the stream (pageable) or, under CUDA-graph capture, read a freed pinned buffer.
    if device not in _TABLE_CONSTANTS:
        e = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        e = torch.nan_to_num(e, nan=0.0)
        mids = torch.tensor([m for m, _ in E2M1_MIDPOINTS], dtype=torch.float32)
        ties_down = torch.tensor([t for _, t in E2M1_MIDPOINTS])
        _TABLE_CONSTANTS[device] = (e.to(device), (e[:, None] * mids).to(device), ties_down.to(device))
    return _TABLE_CONSTANTS[device]


def decision_table(s2: torch.Tensor) -> torch.Tensor:
    """The E2M1 decision of this module restated in ``|x|`` space: ``[128, 8]`` fp32 on ``s2``'s device
    (``s2.shape + (128, 8)`` for a tensor of several ``s2``: one table each, in one batch of ops).

    Row ``c`` belongs to the FP8 byte ``c`` (code value ``e``): columns 0..6 hold, for each midpoint
    ``m`` of :data:`E2M1_MIDPOINTS`, the smallest non-negative fp32 ``a`` for which ``u = a / s2``
    (correctly rounded) passes ``m * e`` with the half-to-even comparison; column 7 holds the block
    scale ``e * s2``. So, for any ``x``, the magnitude of :func:`fake_quantize_unchecked` is
    ``q * table[c, 7]`` with ``q`` the number of thresholds ``|x| >= table[c, k]`` passed, mapped to
    :data:`E2M1_VALUES` -- bit for bit, with no division per element (what the fused kernel uses).

    Why it is exact: ``a -> fl(a / s2)`` is monotone, so each comparison is true exactly from one
    ``a`` upwards. That ``a`` lies within 2 ulps of ``fl(m * e * s2)`` (the quotient moves by less
    than an ulp of ``m * e`` per ulp of ``a``); the table evaluates the comparison itself, with the
    same correctly rounded division, on the ``2 * 4 + 1`` floats around that guess and keeps the first
    that passes. ``tests/test_format.py`` checks, for every row and s2s across the whole fp32 range,
    that the first float fails and the last passes (the window brackets the boundary), and that the
    table reproduces :func:`fake_quantize_unchecked`. Rows with ``e == 0`` (and the NaN byte 0x7F,
    never produced) have infinite thresholds and scale 0: the block quantizes to 0.
    """
    s2 = s2.to(torch.float32)
    batch = s2.shape
    s2 = s2.reshape(-1, 1, 1)  # [L, 1, 1]: one table per value
    e, t, ties_down = _table_constants(s2.device)
    guess = (t * s2).view(torch.int32)  # [L, 128, 7]; non-negative floats order like their bits
    steps = torch.arange(-_WINDOW, _WINDOW + 1, dtype=torch.int32, device=s2.device)
    cand = (guess[..., None] + steps).clamp(min=0).view(torch.float32)  # [L, 128, 7, 9]
    u = cand / s2[..., None]  # the definition's correctly rounded division
    passed = torch.where(ties_down[:, None], u > t[..., None], u >= t[..., None])
    first = passed.to(torch.int8).argmax(dim=-1, keepdim=True)  # first float that passes
    thresholds = cand.gather(-1, first).squeeze(-1)
    thresholds = torch.where(e[:, None] > 0, thresholds, torch.inf)
    table = torch.cat([thresholds, (e * s2.reshape(-1, 1))[..., None]], dim=-1)  # [L, 128, 8]
    return table.reshape(*batch, 128, 8)


def e2m1_magnitude(u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude ``q`` for ``u = |x| / s2`` at FP8 code value ``e`` (broadcasting), fp32.

    ``q`` is built as a sum of exact dyadic steps, one per midpoint that ``u`` passes (with the
    half-to-even comparison of :data:`E2M1_MIDPOINTS`); ``e == 0`` gives 0. In-place updates keep
    the extra memory at one fp32 and one bool tensor of the output's size (the sweep relies on it).
    """
    q = torch.zeros(torch.broadcast_shapes(u.shape, e.shape), dtype=torch.float32, device=u.device)
    prev = 0.0
    for (mid, ties_down), upper in zip(E2M1_MIDPOINTS, E2M1_VALUES[1:], strict=True):
        threshold = e * mid  # exact in fp32: a 3-bit midpoint times a 4-bit code
        passed = torch.gt(u, threshold) if ties_down else torch.ge(u, threshold)
        q.add_(passed, alpha=upper - prev)  # steps 0.5, 1, 2: exact
        prev = upper
    return q.masked_fill_(e == 0, 0.0)


def fake_quantize_unchecked(
    x: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16
) -> torch.Tensor:
    """:func:`fake_quantize_nvfp4` without input validation (hot path of the QAT modules).

    ``block_amax`` must hold ``x.numel() // block_size`` values (any shape).
    """
    s2 = global_scale(global_amax)
    xf = x.to(torch.float32).reshape(-1, block_size)  # (n_blocks, bs)
    e = block_codes(block_amax.reshape(-1, 1), s2)  # (n_blocks, 1)
    u = xf.abs() / s2
    q = e2m1_magnitude(u, e)
    scale = e * s2
    # s2 == 0 (all-zero tensor): u is NaN/inf, but e == 0 there, so q == 0 and the output is 0.
    mag = torch.where(torch.isfinite(xf), q * scale, torch.nan)  # NaN/Inf in -> NaN out
    out = torch.copysign(mag, xf)
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_nvfp4(
    x: torch.Tensor,
    block_amax: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = 16,
) -> torch.Tensor:
    """Fake-quantize ``x`` to NVFP4 with static scales (see the module docstring).

    Args:
        x: floating tensor whose last dim is divisible by ``block_size``.
        block_amax: fp32 per-block amax, shape ``x.shape[:-1] + (x.shape[-1] // block_size,)``
            or flat ``[n_blocks]``; finite and non-negative.
        global_amax: per-tensor amax (scalar tensor or number), finite and non-negative.
        block_size: elements per block (16 for NVFP4).

    Returns:
        Tensor with the shape and dtype of ``x``: ``sign(x) * q * (e * s2)``; NaN where ``x`` is
        NaN or Inf.

    Raises:
        ValueError, TypeError: on bad input, naming the argument.
    """
    from nvfp4_qat._validation import check_block_amax, check_global_amax, check_x

    check_x(x, block_size)
    g = check_global_amax(global_amax, x)
    check_block_amax(block_amax, x, block_size)
    return fake_quantize_unchecked(x, block_amax, g, block_size)
