"""Public NVFP4 scale sweep: validation, then dispatch to the reference or the Triton kernels."""

from __future__ import annotations

import math

import torch

from nvfp4_qat._sweep_reference import sweep_reference
from nvfp4_qat._validation import (
    BACKENDS,
    METHODS,
    check_choice,
    check_finite,
    check_global_amax,
    check_x,
    interpreter_on,
)
from nvfp4_qat.format import block_code_bytes, fake_quantize_unchecked, global_scale


def triton_available() -> bool:
    """Whether the Triton kernels can be imported (triton installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, block_size: int = 16) -> str:
    """Turn ``"auto"`` into ``"triton"`` or ``"reference"``; refuse impossible requests.

    ``auto`` picks Triton for CUDA tensors when triton imports and ``block_size == 16``, else the
    reference. ``triton`` on a CPU tensor needs Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    check_choice(backend, BACKENDS, "backend")
    if backend == "reference":
        return "reference"
    usable = device.type == "cuda" or interpreter_on()
    if backend == "auto":
        return "triton" if usable and block_size == 16 and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package, which is not importable")
    if not usable:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU "
            f"interpreter), got a tensor on {device}"
        )
    if block_size != 16:
        raise ValueError(f"backend='triton' supports block_size=16 only, got {block_size}")
    return "triton"


def nvfp4_scale_sweep(
    x: torch.Tensor,
    global_amax: torch.Tensor | float,
    block_size: int = 16,
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

    Raises:
        TypeError, ValueError: bad ``x`` (also NaN/Inf or on the meta device), ``global_amax``
            (also 0 for non-zero ``x``, or so large that every block would quantize to 0),
            ``block_size``, ``backend`` or ``method`` (the message names the argument).
        RuntimeError: ``backend="triton"`` without triton installed.
    """
    check_x(x, block_size)
    check_choice(method, METHODS, "method")
    resolve_backend(backend, x.device, block_size)
    x = x.detach()  # the sweep writes into out= buffers, which autograd refuses; scales get no gradient
    g = check_global_amax(global_amax, x)
    _check_values(x, g)
    return sweep_unchecked(x, g, block_size, backend, method)


def _check_values(x: torch.Tensor, g: torch.Tensor) -> None:
    """Refuse non-finite ``x`` and a ``global_amax`` that would zero every block: one pass over
    ``x`` and one host sync (``max |x|`` is NaN or Inf exactly when ``x`` holds NaN or Inf)."""
    if x.numel() == 0:
        return
    amax = x.abs().amax().to(torch.float32)
    amax_v, g_v, u_v = torch.stack([amax, g.reshape(()), amax / global_scale(g)]).tolist()
    if not math.isfinite(amax_v):
        check_finite(x)  # counts the bad elements and raises
    # A global_amax of 0 for non-zero data, or so far above it that u = max|x| / s2 is at most
    # 0.25 times the smallest FP8 code (2^-9), makes every candidate quantize everything to 0:
    # refuse that rather than return all-zero scales. global_amax is normally max |x|.
    if amax_v > 0 and (g_v == 0 or u_v <= 2.0**-11):
        raise ValueError(
            f"global_amax must be > 0 and below about {amax_v * 2688 * 2**11:.6g} for x whose "
            f"max |x| is {amax_v:.6g} (normally global_amax = max |x|), got {g_v:.6g}: every "
            "block would quantize to 0"
        )


def sweep_unchecked(
    x: torch.Tensor,
    global_amax: torch.Tensor,
    block_size: int = 16,
    backend: str = "auto",
    method: str = "pruned",
) -> torch.Tensor:
    """:func:`nvfp4_scale_sweep` without the value checks, for callers that have made them.

    ``recalibrate`` checks every weight's finiteness once for all layers; the public function's
    own check reads the whole weight and syncs with the host, which on an H100 doubles the time of
    the pruned kernel. ``global_amax`` must be a finite, non-negative 0-dim fp32 tensor on ``x``'s
    device; ``x`` must be finite.
    """
    x = x.detach()
    if resolve_backend(backend, x.device, block_size) == "triton":
        from nvfp4_qat.kernels.sweep import sweep_triton

        return sweep_triton(x, global_amax, method=method)
    return sweep_reference(x, global_amax, block_size)


def sweep_with_stats(
    x: torch.Tensor, global_amax: torch.Tensor, backend: str, method: str, old_codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sweep_unchecked` (block 16) plus what a recalibration report needs, from the same pass.

    Args:
        x, global_amax, backend, method: as :func:`sweep_unchecked` (``x`` finite).
        old_codes: uint8 ``[n_blocks]``, the FP8 bytes of the scales being replaced.

    Returns:
        ``(block_amax [n_blocks] fp32, codes [n_blocks] uint8, sse, n_changed)``: the sweep's result,
        the FP8 byte it selects in each block (:func:`~nvfp4_qat.format.block_code_bytes`), the
        summed squared fp32 error at the new scales (the minimised loss; 0-dim fp32) and the number
        of blocks whose byte differs from ``old_codes`` (0-dim). The Triton kernels produce the
        last three while sweeping; the reference recomputes them.
    """
    if resolve_backend(backend, x.device, 16) == "triton":
        from nvfp4_qat.kernels.sweep import launch_sweep

        out, _, (codes, part) = launch_sweep(x, global_amax, method, stats=True, buffers={"old": old_codes})
        return out, codes, part[0].sum(), part[1].sum()
    out = sweep_reference(x, global_amax, 16)
    codes = block_code_bytes(out, global_scale(global_amax))
    xf = x.to(torch.float32)
    sse = (fake_quantize_unchecked(xf, out, global_amax, 16) - xf).square().sum()
    return out, codes, sse, (codes != old_codes.reshape(-1)).sum()
