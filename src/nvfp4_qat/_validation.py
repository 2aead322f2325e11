"""Input validation shared by the fake-quant, the reference sweep and the Triton kernels.

Every public entry point refuses bad input here, at the boundary, with an error that names the
argument and the expected value, so that nothing fails deep inside torch or returns a NaN scale.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "reference")
METHODS = ("pruned", "exhaustive")
#: The sweep refuses a global amax for which u = max |x| / s2 is at most this (0.25 times the smallest
#: FP8 code): every candidate would quantize every element to 0.
ZERO_U_BOUND = 2.0**-11
#: The sweep's value checks as codes (``nvfp4_scale_sweep_ex``'s ``info``; 0: valid), in the order
#: the checks apply: ``global_amax`` negative, NaN or Inf; ``x`` holds NaN or Inf; ``global_amax`` 0
#: for non-zero ``x``, or so large that u <= ZERO_U_BOUND.
INFO_BAD_GLOBAL_AMAX = 2
INFO_NONFINITE_X = 1
INFO_ALL_ZERO = 3


def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at each call: tests set it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    return block_size


def check_x(x: object, block_size: object, *, name: str = "x") -> None:
    """Type, dtype, shape and block divisibility of the tensor to quantize."""
    bs = check_block_size(block_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype in ({allowed}), got {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device (no data); materialize it first")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with at least 1 dim, got shape {tuple(x.shape)}")
    if x.shape[-1] % bs != 0:
        raise ValueError(f"{name}.shape[-1] must be divisible by block_size={bs}, got shape {tuple(x.shape)}")


def check_finite(x: torch.Tensor, *, name: str = "x") -> None:
    """Refuse NaN/Inf (one device sync): a non-finite weight would give a NaN scale."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, but {bad} of {x.numel()} elements are NaN or Inf")


def check_global_amax(global_amax: object, x: torch.Tensor, *, check_value: bool = True) -> torch.Tensor:
    """Return ``global_amax`` as a 0-dim fp32 tensor on ``x``'s device, or raise.

    ``check_value=False`` skips the value check (finite, >= 0), which reads a GPU tensor back to the
    host; the caller then checks it later, with its own values (the public sweep on CUDA does).
    """
    if isinstance(global_amax, bool) or not isinstance(global_amax, (torch.Tensor, int, float)):
        raise TypeError(f"global_amax must be a scalar tensor or a number, got {type(global_amax).__name__}")
    if isinstance(global_amax, torch.Tensor):
        if global_amax.numel() != 1:
            raise ValueError(
                f"global_amax must be a scalar (one element), got shape {tuple(global_amax.shape)}"
            )
        if not global_amax.is_floating_point():
            raise TypeError(f"global_amax must be a floating tensor, got {global_amax.dtype}")
        if global_amax.device != x.device:
            raise ValueError(
                f"x and global_amax must be on the same device, got x on {x.device} and "
                f"global_amax on {global_amax.device}"
            )
        g = global_amax.detach().reshape(()).to(torch.float32)
    else:
        # Rounded to fp32 on the host (1e40 -> inf, as torch.tensor does), then a fill on x's device:
        # a copy from host memory would wait for the GPU (nvfp4_scale_sweep_ex promises no sync).
        value = torch.tensor(float(global_amax), dtype=torch.float32).item()
        g = torch.full((), value, dtype=torch.float32, device=x.device)
    if not check_value:
        return g
    value = float(g)
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"global_amax must be finite and >= 0, got {value}")
    return g


def check_block_amax(block_amax: object, x: torch.Tensor, block_size: int) -> None:
    if not isinstance(block_amax, torch.Tensor):
        raise TypeError(f"block_amax must be a torch.Tensor, got {type(block_amax).__name__}")
    if not block_amax.is_floating_point():
        raise TypeError(f"block_amax must be a floating tensor (fp32), got {block_amax.dtype}")
    n_blocks = x.numel() // block_size
    blocked = tuple(x.shape[:-1]) + (x.shape[-1] // block_size,)
    if tuple(block_amax.shape) not in (blocked, (n_blocks,)):
        raise ValueError(
            f"block_amax must have shape {blocked} or ({n_blocks},) for x of shape "
            f"{tuple(x.shape)} and block_size={block_size}, got {tuple(block_amax.shape)}"
        )
    if block_amax.device != x.device:
        raise ValueError(
            f"x and block_amax must be on the same device, got x on {x.device} and "
            f"block_amax on {block_amax.device}"
        )
    finite = torch.isfinite(block_amax) & (block_amax >= 0)
    if not bool(finite.all()):
        raise ValueError("block_amax must be finite and >= 0 everywhere")


def check_choice(value: object, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]
