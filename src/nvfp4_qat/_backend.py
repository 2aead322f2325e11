"""Which implementation runs: the one rule for Triton versus PyTorch, shared by every caller.

The sweep (``backend=``), the fake-quant (``QATConfig.fake_quant_backend``), recalibration's plan
and the command's checks all ask :func:`resolve_backend`, so that "Triton needs a CUDA tensor, or
Triton's CPU interpreter (``TRITON_INTERPRET=1``), and the ``triton`` package" is written once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys

import torch

from nvfp4_qat._validation import BACKENDS, check_choice, interpreter_on
from nvfp4_qat.format import BLOCK_SIZE

__all__ = [
    "BACKENDS",
    "launch_device",
    "on_device",
    "require_triton",
    "resolve_backend",
    "triton_available",
    "triton_usable",
]


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (found without importing it: that costs seconds)."""
    if "triton" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: CUDA, or any device under the interpreter."""
    return (device.type == "cuda" or interpreter_on()) and triton_available()


def require_triton(device: torch.device, what: str) -> None:
    """Raise unless Triton kernels can run on ``device``; ``what`` starts the message.

    Raises:
        RuntimeError: the ``triton`` package is missing.
        ValueError: ``device`` is not CUDA and the interpreter is off.
    """
    if not triton_available():
        raise RuntimeError(f"{what} needs the `triton` package, which is not importable")
    if not triton_usable(device):
        raise ValueError(
            f"{what} needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter), "
            f"got a tensor on {device}"
        )


def resolve_backend(
    backend: str, device: torch.device, block_size: int = BLOCK_SIZE, name: str = "backend"
) -> str:
    """Turn ``backend`` into ``"triton"`` or ``"reference"`` for tensors on ``device``.

    ``"auto"`` picks Triton where it can run (:func:`triton_usable`) and the block is the NVFP4
    block of 16, else the PyTorch reference; ``"triton"`` is refused where it cannot run.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        device: where the tensors are.
        block_size: elements per block (the kernels support 16 only).
        name: the argument's name for error messages (e.g. ``"fake_quant_backend"``).

    Raises:
        ValueError: an unknown ``backend``; ``"triton"`` for a non-CUDA device without the
            interpreter, or a block size other than 16.
        RuntimeError: ``"triton"`` without the ``triton`` package.
    """
    check_choice(backend, BACKENDS, name)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if triton_usable(device) and block_size == BLOCK_SIZE else "reference"
    require_triton(device, f"{name}='triton'")
    if block_size != BLOCK_SIZE:
        raise ValueError(f"{name}='triton' supports block_size={BLOCK_SIZE} only, got {block_size}")
    return "triton"


def on_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without a host sync.

    A plain copy to a GPU from pageable memory waits for everything queued on the stream; the
    recalibration pipeline queues its kernels for all layers and must not stall on a constant.
    """
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def launch_device(device: torch.device):
    """A context in which Triton launches on ``device``: Triton launches on the current CUDA device,
    so a model on cuda:1 while cuda:0 is current would otherwise run there with cuda:1 pointers.
    The guard is entered only when ``device`` is another GPU than the current one (entering it on
    every call cost host time that the public sweep's GPU waited through)."""
    other = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    return torch.cuda.device(device) if other else contextlib.nullcontext()
