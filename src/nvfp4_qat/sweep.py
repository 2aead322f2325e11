"""Public NVFP4 scale sweep: validation, then dispatch to the reference or the Triton kernels.

The backend is resolved by :func:`nvfp4_qat._backend.resolve_backend` (the one Triton/CUDA rule).
On the Triton path the value checks ride on the launch instead of preceding it: the kernels
record ``max |x|`` (+inf where ``x`` holds NaN or Inf), and one host read after the launch (that
maximum and the global amax) decides whether to raise. Checks before the launch held
the GPU idle while the host launched them: a ``max |x|`` pass, then ~25 small launches to combine
the flags, cost the public call 0.78 ms against the kernel's 0.41 on an H200.

That read is still a host sync per call: :func:`nvfp4_scale_sweep_ex` returns the same checks as a
device flag instead (one small launch on the Triton path), for callers that sweep many weights.
"""

from __future__ import annotations

import math
import typing

import torch

from nvfp4_qat._backend import resolve_backend
from nvfp4_qat._sweep_reference import sweep_reference
from nvfp4_qat._validation import (
    INFO_ALL_ZERO,
    INFO_BAD_GLOBAL_AMAX,
    INFO_NONFINITE_X,
    METHODS,
    ZERO_U_BOUND,
    check_choice,
    check_finite,
    check_global_amax,
    check_x,
)
from nvfp4_qat.format import BLOCK_SIZE, GLOBAL_SCALE_DIVISOR, global_scale

__all__ = [
    "INFO_ALL_ZERO",
    "INFO_BAD_GLOBAL_AMAX",
    "INFO_NONFINITE_X",
    "nvfp4_scale_sweep",
    "nvfp4_scale_sweep_ex",
]


def nvfp4_scale_sweep(
    x: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = BLOCK_SIZE,
    backend: str = "auto",
    method: str = "pruned",
) -> torch.Tensor:
    """MSE-optimal per-block NVFP4 scales: the best of all 126 FP8 E4M3 codes for each block.

    Each block's candidates are scored with exactly the error that
    :func:`~nvfp4_qat.fake_quantize_nvfp4` gives at that scale (a pairwise-tree sum of the 16
    squared errors); ties go to the smallest code. The result is bit-identical across backends
    and devices.

    Args:
        x: fp32/fp16/bf16 tensor of any shape whose last dim is divisible by ``block_size``;
            blocks are consecutive elements along the last dim.
        global_amax: per-tensor amax (scalar tensor on ``x``'s device, or a number), finite, >= 0.
        block_size: elements per block (16 for NVFP4).
        backend: ``"auto"`` (Triton on CUDA when available, else reference), ``"triton"`` or
            ``"reference"``.
        method: ``"pruned"`` (default; exact, evaluates about a tenth of the candidates) or
            ``"exhaustive"``; the reference always sweeps exhaustively, with the same result.

    Returns:
        fp32 tensor ``[n_blocks]`` on ``x``'s device: ``block_amax = (v / 448) * global_amax``
        for the winning code ``v``, in row-major block order.

    It reads two values back from the GPU to raise on bad values (one host sync per call):
    :func:`nvfp4_scale_sweep_ex` returns them as a flag instead, for sweeps of many weights.

    Raises:
        TypeError, ValueError: bad ``x`` (also NaN/Inf or on the meta device), ``global_amax``
            (also 0 for non-zero ``x``, or so large that every block would quantize to 0),
            ``block_size``, ``backend`` or ``method`` (the message names the argument).
        RuntimeError: ``backend="triton"`` without triton installed.
    """
    x, g, on_triton = _validated(x, global_amax, block_size, backend, method)
    if not on_triton:  # the values are at hand: refuse bad ones before a sweep of seconds on the CPU
        _raise_if_invalid(x, *torch.stack(_values(x, g)).tolist())
        return sweep_reference(x, g, block_size)
    out, checks = _launch(x, g, method)
    _raise_if_invalid(x, *_read_checks(checks))  # the one host sync, after the launch
    return out


def nvfp4_scale_sweep_ex(
    x: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = BLOCK_SIZE,
    backend: str = "auto",
    method: str = "pruned",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nvfp4_scale_sweep` without its host sync: the value checks come back as a flag.

    As ``torch.linalg.inv_ex`` is to ``inv``: where :func:`nvfp4_scale_sweep` reads its checks back
    from the GPU and raises, this returns them as a device tensor and never waits for the GPU, so
    that sweeps of many weights queue back to back. Check ``info`` before using a result, at once
    for many calls if you like: ``torch.stack(infos).any()`` is one sync.

    Args:
        x, global_amax, block_size, backend, method: as for :func:`nvfp4_scale_sweep`.

    Returns:
        ``(block_amax, info)``: ``block_amax`` as :func:`nvfp4_scale_sweep` returns it, and ``info``,
        a 0-dim int32 tensor on ``x``'s device: 0 where the input was valid (``block_amax`` is then
        bit-identical to :func:`nvfp4_scale_sweep`'s), else :data:`INFO_BAD_GLOBAL_AMAX`,
        :data:`INFO_NONFINITE_X` or :data:`INFO_ALL_ZERO` (the first that applies, in that order:
        the errors :func:`nvfp4_scale_sweep` raises), and ``block_amax`` means nothing.

    Raises:
        TypeError, ValueError: what needs no read from the GPU: ``x``'s type, dtype, shape and
            device, ``global_amax``'s type, shape and device, ``block_size``, ``backend``, ``method``.
        RuntimeError: ``backend="triton"`` without triton installed.
    """
    x, g, on_triton = _validated(x, global_amax, block_size, backend, method)
    if not on_triton:
        return sweep_reference(x, g, block_size), _info(*_values(x, g))
    from nvfp4_qat.kernels.sweep import launch_info

    out, checks = _launch(x, g, method)
    return out, launch_info(checks)  # one small launch, no read


def _validated(
    x: object, global_amax: object, block_size: object, backend: object, method: object
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What the host checks without reading the GPU; ``(x detached, global amax as a 0-dim fp32
    tensor on x's device, whether the Triton kernels run)``."""
    check_x(x, block_size)
    check_choice(method, METHODS, "method")
    x = typing.cast(torch.Tensor, x)
    on_triton = resolve_backend(backend, x.device, block_size) == "triton"
    x = x.detach()  # the sweep writes into out= buffers, which autograd refuses; scales get no gradient
    if on_triton and x.numel() // block_size > 2**31 - 1:  # the kernels index blocks with int32
        raise ValueError(
            f"x must hold fewer than 2**31 blocks for backend='triton', got {x.numel() // block_size}"
        )
    return x, check_global_amax(global_amax, x, check_value=False), on_triton


def _launch(x: torch.Tensor, g: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton sweep of validated input: ``(block_amax, checks)``, ``checks`` the launch's
    :func:`~nvfp4_qat.kernels.sweep.check_values` (max |x| per slot, then the global amax)."""
    from nvfp4_qat.kernels.sweep import check_values, launch_sweep  # validated here: the unchecked launcher

    out, _, (_, part) = launch_sweep(x, g, method)
    return out, check_values(part)


def _read_checks(checks: torch.Tensor) -> tuple[float, float]:
    """``(max |x|, global amax)`` from a launch's checks, in one host read."""
    values = checks.tolist()
    return max(values[:-1]), values[-1]


def _info(amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """:func:`_raise_if_invalid`'s rule on the device, as an ``info`` code (int32, 0-dim), for the
    reference backend (the Triton path runs it as one kernel, ``_sweep_info_kernel``: a dozen small
    launches cost the host more than the sweep's GPU time). Tests check that all three agree."""
    bad_g = ~((g >= 0) & (g < math.inf))  # NaN fails both
    nonfinite = ~(amax < math.inf)  # amax = max |x| >= 0; NaN fails
    zero = (amax > 0) & ((g == 0) | (amax / global_scale(g) <= ZERO_U_BOUND))
    code = torch.where(zero, INFO_ALL_ZERO, 0)
    code = torch.where(nonfinite, INFO_NONFINITE_X, code)
    return torch.where(bad_g, INFO_BAD_GLOBAL_AMAX, code).to(torch.int32)


def _u(amax: float, g: float) -> float:
    """``max |x| / s2`` in fp32 (CPU and CUDA divide tensors correctly rounded, so the device would
    give the same), where it decides the check (near 2**-11); NaN where it is not defined."""
    if not (amax > 0 and g > 0 and math.isfinite(amax) and math.isfinite(g)):
        return math.nan
    if g < amax * (GLOBAL_SCALE_DIVISOR * 2.0**10):  # u > about 2**-10: far from the bound, and
        return 1.0  # any value above 2**-11 decides the same
    f32 = torch.float32
    # On the CPU: correctly rounded.
    return float(torch.tensor(amax, dtype=f32) / global_scale(torch.tensor(g, dtype=f32)))


def _values(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max |x|, global_amax)``, fp32 0-dim, from one pass over ``x``, no host sync.

    ``max |x|`` is NaN or Inf exactly when ``x`` holds NaN or Inf (the max propagates NaN)."""
    return torch.linalg.vector_norm(x, float("inf")).to(torch.float32), g.reshape(())


def _raise_if_invalid(x: torch.Tensor, amax: float, g: float) -> None:
    """Refuse non-finite ``x`` and a ``global_amax`` that is negative, non-finite, or would zero
    every block; both backends decide here, from the same two host values."""
    if not (g >= 0.0 and math.isfinite(g)):
        raise ValueError(f"global_amax must be finite and >= 0, got {g}")
    if not math.isfinite(amax):
        check_finite(x)  # counts the bad elements and raises
    # A global_amax of 0 for non-zero data, or so far above it that u = max|x| / s2 is at most
    # 0.25 times the smallest FP8 code (2^-9), makes every candidate quantize everything to 0:
    # refuse that rather than return all-zero scales. global_amax is normally max |x|.
    if amax > 0 and (g == 0 or _u(amax, g) <= ZERO_U_BOUND):
        raise ValueError(
            f"global_amax must be > 0 and below about {amax * 2688 * 2**11:.6g} for x whose "
            f"max |x| is {amax:.6g} (normally global_amax = max |x|), got {g:.6g}: every "
            "block would quantize to 0"
        )
