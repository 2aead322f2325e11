"""The GPU fast path of :func:`~nvfp4_qat.recalibrate`: the kernel cost plus little else.

The generic path (:func:`~nvfp4_qat.recalibrate.update_layer`) spends a dozen small launches per
layer on bookkeeping; on a model with hundreds of layers those launches, not the weight passes,
dominate. Here every layer costs:

1. its share of a stats launch (:func:`~nvfp4_qat.kernels.fake_quant.stats_partials`: stale-scale
   error, ``max |w|`` and ``sum w^2`` from one read of the weight);
2. the sweep kernels, which write the new ``block_amax`` straight into the layer's buffer and also
   emit each block's FP8 byte and, per program, the sum of the winning losses and the count of
   changed bytes.

No host sync comes between them: the GPU runs every stats pass and every sweep back to back while
the host queues them, and the finiteness check rides on the global amax (a layer with NaN/Inf
weights gets a NaN one, for which the sweep kernels do nothing; see :func:`recalibrate_all`). A sync
per layer, or one between the two passes, left the GPU idle while the host launched the next
kernels (the stats kernel is shorter than its launch on the small layers).

The rest runs in a few launches for all layers: the stats pass is one launch per
:data:`STATS_CHUNK` layers of a dtype (:func:`~nvfp4_qat.kernels.fake_quant.stats_partials`), the
partial sums are reduced by one launch each (:func:`~nvfp4_qat.kernels.fake_quant.segment_totals`),
the global amaxes are written with one ``_foreach_copy_``, and the decision tables of the new scales
are built in one batch and installed in the layers' kernel caches (the FP8 bytes come from the
sweep), so the next forward does not prepare them again.

It returns exactly what the generic path returns: the same scales, bit for bit, and report values
equal to fp32 rounding of the sums.
"""

from __future__ import annotations

import torch

from nvfp4_qat.format import GLOBAL_SCALE_DIVISOR, decision_table
from nvfp4_qat.kernels import fake_quant as fq
from nvfp4_qat.kernels.sweep import launch_sweep, stats_slots
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.sweep import resolve_backend

__all__ = ["fused_applicable", "recalibrate_all", "stale_stats"]


def fused_applicable(layers: list[tuple[str, NVFP4Linear]], backend: str) -> bool:
    """Whether every layer can take the fast path: plain weights on one device where the fused
    fake-quant kernel runs, and a sweep backend that resolves to Triton."""
    if not layers:
        return False
    devices = {m.weight.device for _, m in layers} | {m.block_amax.device for _, m in layers}
    if len(devices) != 1:
        return False
    for _, m in layers:
        w = m.weight
        if type(w.data) is not torch.Tensor or m.kernel_state(w) is None:  # DTensor, other devices
            return False
    device = devices.pop()
    return resolve_backend(backend, device, 16) == "triton"


#: Layers per stats launch. One launch per layer cost more host time than GPU time on the small
#: layers; one launch for the whole model left the GPU idle while the host prepared it (~2 ms for
#: the 224 Llama-3-8B weights). With chunks the GPU starts on the first while the host prepares
#: the next.
STATS_CHUNK = 32


def stale_stats(layers: list[tuple[str, NVFP4Linear]]) -> torch.Tensor:
    """``[L, 3]`` fp32: each layer's ``[sse, max |w|, sum w^2]`` at its current scales (no host sync).

    One stats launch per :data:`STATS_CHUNK` layers of one weight dtype."""
    device = layers[0][1].weight.device
    groups: dict[torch.dtype, list[int]] = {}
    for i, (_, m) in enumerate(layers):
        groups.setdefault(m.weight.dtype, []).append(i)
    chunks = [idx[c : c + STATS_CHUNK] for idx in groups.values() for c in range(0, len(idx), STATS_CHUNK)]
    parts = []
    for chunk in chunks:
        weights = [layers[i][1].weight.detach() for i in chunk]
        states = [layers[i][1].kernel_state(w) for i, w in zip(chunk, weights, strict=True)]
        partials, programs = fq.stats_partials(weights, states)
        parts.append(fq.segment_totals(partials, programs, max_row=1))  # max: NaN wins
    order = [i for chunk in chunks for i in chunk]
    if order == list(range(len(layers))):  # one dtype: the chunks are in order
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    index = fq.on_device(order, torch.int64, device)
    return torch.empty(len(layers), 3, dtype=torch.float32, device=device).index_copy_(
        0, index, torch.cat(parts)
    )


def recalibrate_all(
    layers: list[tuple[str, NVFP4Linear]], method: str, all_or_nothing: bool
) -> tuple[list[list[float]], list[bool], list[float]]:
    """Recalibrate every finite layer in place, with one host sync at the very end.

    Nothing waits for the finiteness check: a layer whose weight holds NaN/Inf has a non-finite
    max (the stats pass's max propagates NaN), and the sweep kernels launched with a non-finite
    global amax read and write nothing (``_sweep_kernels._live``); its ``global_amax`` is written
    back unchanged. With ``all_or_nothing`` (``on_nonfinite="raise"``) one such layer makes every
    layer's amax non-finite, so that no scale anywhere changes and the caller can raise.

    Args:
        layers: the layers, all on one GPU (:func:`fused_applicable`).
        method: ``"pruned"`` or ``"exhaustive"``.
        all_or_nothing: leave every layer untouched if any weight is non-finite.

    Returns:
        ``(rows, finite, seconds)``: per layer ``[sse_before, sse_after, n_changed, energy,
        amax_before, amax_after]`` (float64 values; meaningless where the layer was left alone),
        whether its weight is finite, and the device time of its sweep.
    """
    from nvfp4_qat.recalibrate import LayerClock  # lazily: that module imports this one lazily

    before = stale_stats(layers)
    device = before.device
    g_new = before[:, 1]  # max |w| of each layer: exact; NaN or Inf for a non-finite weight
    finite = torch.isfinite(g_new)
    live = finite & finite.all() if all_or_nothing else finite
    g_use = torch.where(live, g_new, torch.nan)
    g_old = torch.stack([m.global_amax for _, m in layers])
    n_blocks = [m.block_amax.numel() for _, m in layers]
    codes = torch.empty(sum(n_blocks), dtype=torch.uint8, device=device)  # kept by the layers' caches
    slots = [stats_slots(n) for n in n_blocks]
    partials = torch.zeros(2, sum(slots), dtype=torch.float32, device=device)
    work = torch.empty(max(n_blocks), dtype=torch.int32, device=device)  # scratch, one stream
    counts = torch.zeros(len(layers), dtype=torch.int32, device=device)
    clock = LayerClock(device)
    start = col = 0
    for i, ((_, m), g, n, k) in enumerate(
        zip(layers, g_use.view(-1, 1).unbind(), n_blocks, slots, strict=True)
    ):
        buffers = {
            "out": m.block_amax.view(-1),  # written in place by the kernel (not at all if g is NaN)
            "codes": codes[start : start + n],
            "old": m.kernel_state(m.weight)[0].reshape(-1),  # the stale scales' bytes, cached
            "partials": partials[:, col : col + k],
            "count": counts[i : i + 1],
            "work": work,
        }
        launch_sweep(m.weight.detach(), g, method, stats=True, buffers=buffers)
        torch.autograd.graph.increment_version(m.block_amax)  # written by a kernel, not by PyTorch
        start, col = start + n, col + k
        clock.mark()
    sse_after, changed = fq.segment_totals(partials, slots).unbind(1)
    g_write = torch.where(live, g_new, g_old)
    torch._foreach_copy_([m.global_amax for _, m in layers], list(g_write.unbind()))
    # The next forward's kernel state: bytes from the sweep, tables for the new s2 in one batch.
    divisor = torch.full((), GLOBAL_SCALE_DIVISOR, dtype=torch.float32, device=device)
    s2 = g_write / divisor  # format.global_scale, for all layers at once
    tables = decision_table(s2).reshape(len(layers), -1)
    cols = (before[:, 0], sse_after, changed, before[:, 2], g_old, g_new, finite, live)
    values = torch.stack([c.to(torch.float64) for c in cols], dim=1).tolist()  # the host sync
    start = 0
    for i, ((_, m), n) in enumerate(zip(layers, n_blocks, strict=True)):
        if values[i][7]:  # written: hand the sweep's bytes to the layer
            m.set_kernel_state(codes[start : start + n], tables[i])
        start += n
    return [v[:6] for v in values], [bool(v[6]) for v in values], clock.seconds()
