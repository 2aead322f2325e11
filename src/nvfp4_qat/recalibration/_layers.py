"""Per-layer primitives of a recalibration: the weight to sweep, its error at the current scales,
the FP8 bytes of those scales, per-layer clocks, snapshots, and the non-finite policy."""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterator

import torch

from nvfp4_qat.format import block_code_bytes, global_scale
from nvfp4_qat.modules import NVFP4Linear, quant_error_stats

__all__ = [
    "ON_NONFINITE",
    "HostCopy",
    "LayerClock",
    "apply_nonfinite_policy",
    "full_weight",
    "restore_scales",
    "scale_codes",
    "scale_snapshot",
    "weight_sse",
    "weight_stats",
]

#: ``on_nonfinite`` values: ``"raise"`` (nothing written) or ``"skip"`` (that layer keeps its scales; warns).
ON_NONFINITE = ("raise", "skip")

Layers = list[tuple[str, NVFP4Linear]]


def full_weight(layer: NVFP4Linear) -> torch.Tensor:
    """The layer's whole weight, detached. FSDP2 shards weights as ``DTensor`` but not the scale
    buffers, so the sweep needs the gathered tensor (a collective: every rank must call this)."""
    w = layer.quant_tensors()[0].detach()
    gather = getattr(w, "full_tensor", None)  # only DTensor has it
    return gather() if callable(gather) else w


def weight_stats(
    layer: NVFP4Linear, w: torch.Tensor | None = None, rows: slice | None = None
) -> torch.Tensor:
    """``[sse, max |w|, sum w^2]`` (fp32, no host sync) of the layer's weight at its current scales.

    ``sse`` is the summed squared NVFP4 error in fp32 (:func:`~nvfp4_qat.modules.quant_error_stats`),
    what the sweep minimises. One read of the weight on a GPU. ``max |w|`` is NaN or Inf exactly
    when the weight holds NaN or Inf.

    Args:
        layer: the layer.
        w: the weight to measure (default: :func:`full_weight`); with ``rows``, those rows only.
        rows: the rows of the layer that ``w`` holds (a row shard), to pick their scales.
    """
    with torch.no_grad():
        w = full_weight(layer) if w is None else w
        backend = layer.fake_quant_backend
        if rows is None:
            state = layer.kernel_state(w)
            return quant_error_stats(w, layer.block_amax, layer.global_amax, backend, state)
        return quant_error_stats(w, layer.block_amax[rows], layer.global_amax, backend)


def weight_sse(layer: NVFP4Linear) -> tuple[torch.Tensor, int]:
    """Sum of squared weight error (fp32 NVFP4 error) at the layer's current scales.

    Returns:
        ``(sse, numel)``: a 0-dim fp32 tensor on the weight's device (no host sync) and the
        number of weights.
    """
    return weight_stats(layer)[0], layer.weight.numel()


def scale_codes(layer: NVFP4Linear, rows: slice | None = None) -> torch.Tensor:
    """The FP8 bytes (``uint8``, flat, row-major) of the layer's current block scales (``rows`` only).

    The fused kernel's cached bytes where the layer has them, else :func:`~nvfp4_qat.format.block_code_bytes`.
    """
    state = layer.kernel_state(layer.block_amax)
    if state is not None:
        codes = state[0].reshape(layer.block_amax.shape)
    else:
        codes = block_code_bytes(layer.block_amax, global_scale(layer.global_amax))
    return (codes if rows is None else codes[rows]).reshape(-1)


class LayerClock:
    """Per-layer times without a host sync per layer: CUDA events on a GPU, ``perf_counter`` else.

    Call :meth:`mark` after each layer's work is queued, :meth:`seconds` once at the end. On a GPU
    the intervals are device time between the marks on ``stream`` (default: the stream current
    when the clock is made); elsewhere (the work is synchronous) wall time.
    """

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None) -> None:
        # The stream is looked up once: per mark it cost more host time than the event itself.
        if device.type == "cuda" and stream is None:
            stream = torch.cuda.current_stream(device)
        self._stream = stream if device.type == "cuda" else None
        self._marks: list = []
        self.mark()

    def mark(self) -> None:
        if self._stream is None:
            self._marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        self._marks.append(event)

    def seconds(self) -> list[float]:
        """The intervals between consecutive marks (waits for the last one)."""
        return list(self.intervals())

    def intervals(self) -> Iterator[float]:
        """:meth:`seconds` one at a time, each read as soon as its interval ends on the GPU."""
        if self._stream is None:
            yield from (b - a for a, b in itertools.pairwise(self._marks))
            return
        for a, b in itertools.pairwise(self._marks):
            b.synchronize()  # most intervals are read while the GPU still works on later ones
            yield a.elapsed_time(b) / 1e3


class HostCopy:
    """A device tensor's values for the host, copied now without waiting, read later.

    On a GPU: an async copy into page-locked memory and an event, so that the host can queue more
    work before it needs the values (recalibration reads the finiteness flags of the stats pass
    after queueing the sweeps: a read right after the stats pass would hold the sweeps back, and a
    read after the sweeps leaves the GPU idle while the host then prepares the layers' kernel
    states, 3.3 ms of the 73 ms of a Llama-3-8B set on an H200). Elsewhere the tensor itself.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.device.type != "cuda":
            self._host = t
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(t.device))

    def tolist(self) -> list:
        """The values, waiting for the copy (only for it, not for work queued after it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def apply_nonfinite_policy(bad: list[str], on_nonfinite: str, warn: bool = True) -> None:
    """Raise (``"raise"``) or warn (``"skip"``, when ``warn``) about the layers named in ``bad``."""
    if not bad:
        return
    if on_nonfinite == "raise":
        raise ValueError(
            f"non-finite (NaN/Inf) weights in layer {bad[0]!r}"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            + "; no scale was changed (pass on_nonfinite='skip' to keep their old scales and go on)"
        )
    if warn:
        warnings.warn(
            f"recalibrate skipped {len(bad)} layer(s) with non-finite weights, scales kept: {bad}",
            stacklevel=4,
        )


def scale_snapshot(layers: Layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's ``(global_amax, block_amax)``, for :func:`restore_scales`."""
    return [(m.global_amax.clone(), m.block_amax.clone()) for _, m in layers]


def restore_scales(layers: Layers, snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write a :func:`scale_snapshot` back in place (``copy_``: the same buffers)."""
    for (_, m), (g, b) in zip(layers, snapshot, strict=True):
        m.global_amax.copy_(g)
        m.block_amax.copy_(b)
