"""The plain MSE sweep over many layers: the generic path and the fused GPU path, one interface.

A :class:`SweepTask` is a weight to sweep (a layer's full weight, or one rank's rows of it) and the
layer whose scales it updates. Both paths offer the same two steps, so that the single-process and
the distributed recalibration share one orchestration (:mod:`nvfp4_qat.recalibration.engine`):

1. :func:`stale_stats`: the tasks (made from any iterable as the launches go out) and
   ``[sse, max |w|, sum w^2]`` of each at the current scales, no host sync (``max |w|`` is the new
   global amax and, NaN or Inf exactly for a non-finite weight, the finiteness check);
2. :func:`sweep`: the sweep of every task with a given global amax, written in place into the
   layer's ``block_amax`` (its rows); a task whose amax is NaN is left alone.

**Generic** (any backend and device): per task, :func:`~nvfp4_qat.kernels.sweep.launch_sweep` with
its statistics or the PyTorch reference, a dozen small launches each.

**Fused** (sweep and fake-quant on Triton, one device): the stale statistics of all tasks come from
one stats launch per :data:`STATS_CHUNK` tasks of a dtype
(:func:`~nvfp4_qat.kernels.fake_quant.stats_partials`); the sweep kernels write the new scales
straight into the layer's buffer and emit each block's FP8 byte and per-program sums of the winning
losses and of the changed bytes, reduced by one launch (:func:`~nvfp4_qat.kernels.fake_quant.segment_totals`).
No host sync comes between the steps: a NaN global amax makes the sweep kernels read and write
nothing (``_sweep_kernels._live``), so the GPU runs every pass back to back while the host queues
them. A sync per layer, or one between the two steps, left the GPU idle while the host launched
the next kernels (the stats kernel is shorter than its launch on the small layers). The tasks'
sweeps go round robin over :data:`SWEEP_STREAMS` CUDA streams, joined back into the caller's
stream before anything reads their results: on one stream the GPU idled between two tasks' kernels
and in each kernel's last, partly filled wave. Afterwards
:func:`install_kernel_states` hands the sweep's bytes (and the decision tables of the new global
scales, built in one batch) to the layers, so that the next forward does not prepare them again.

Both give the same scales, bit for bit, and the same statistics up to fp32 rounding of the sums.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from nvfp4_qat._backend import launch_device, on_device
from nvfp4_qat._sweep_reference import sweep_reference
from nvfp4_qat.format import (
    BLOCK_SIZE,
    GLOBAL_SCALE_DIVISOR,
    block_code_bytes,
    decision_table,
    fake_quantize_unchecked,
    global_scale,
)
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.recalibration._layers import LayerClock, scale_codes, weight_stats

__all__ = [
    "STATS_CHUNK",
    "SWEEP_STREAMS",
    "SweepOutput",
    "SweepTask",
    "install_kernel_states",
    "stale_stats",
    "sweep",
]

#: Tasks per stats launch on the fused path. One launch per layer cost more host time than GPU
#: time on the small layers; one launch for the whole model left the GPU idle while the host
#: prepared it (~2 ms for the 224 Llama-3-8B weights). With chunks the GPU starts on the first
#: while the host makes the next (and, from a generator of tasks, the tasks themselves).
STATS_CHUNK = 32
#: CUDA streams the fused path spreads its tasks' sweeps over, round robin: the current stream
#: and SWEEP_STREAMS - 1 side streams. On one stream the GPU idles between two tasks' kernels and
#: in each kernel's last, partly filled wave; on two, the other stream's kernels fill both
#: (recalibrate of the Llama-3-8B set about 0.5-1 ms faster on an H200: BENCHMARKS.md, session
#: 11). Same results on any number (tests/test_recalibrate.py).
SWEEP_STREAMS = 2


@dataclass(frozen=True)
class SweepTask:
    """A weight to sweep and the layer whose ``block_amax`` (rows ``rows``) takes the result."""

    layer: NVFP4Linear
    weight: torch.Tensor  # (rows, in) plain tensor: the full weight, or this rank's rows of it
    rows: slice | None = None  # the layer's rows that `weight` holds (None: all)

    @property
    def out(self) -> torch.Tensor:
        """The flat fp32 view of the layer's ``block_amax`` rows that this task writes."""
        b = self.layer.quant_tensors()[1]
        return (b if self.rows is None else b[self.rows]).view(-1)

    @property
    def n_blocks(self) -> int:
        return self.weight.numel() // BLOCK_SIZE


@dataclass
class SweepOutput:
    """What :func:`sweep` measured (``[T]`` tensors on the device, no host sync) and timed."""

    sse_after: torch.Tensor  # summed squared error at the new scales (the minimised loss)
    n_changed: torch.Tensor  # blocks whose FP8 byte changed
    clock: LayerClock | _Interleaved  # one interval per task
    codes: torch.Tensor | None = None  # fused: every task's new bytes, concatenated

    def task_codes(self, tasks: list[SweepTask]) -> list[torch.Tensor]:
        """Each task's new FP8 bytes (views of :attr:`codes`; fused path only)."""
        out, start = [], 0
        for t in tasks:
            out.append(self.codes[start : start + t.n_blocks])
            start += t.n_blocks
        return out

    @property
    def seconds(self) -> list[float]:
        """Each task's time (on a GPU: device time; reading it waits for the last sweep)."""
        return self.clock.seconds()


def stale_stats(tasks: Iterable[SweepTask], fused: bool) -> tuple[list[SweepTask], torch.Tensor]:
    """``(the tasks, [T, 3] fp32)``: each task's ``[sse, max |w|, sum w^2]`` at the current scales,
    no host sync. ``tasks`` may be a generator: on the fused path each stats launch goes out as soon
    as its chunk of tasks exists, so the GPU starts while the host still makes the rest."""
    if not fused:
        tasks = list(tasks)
        device = tasks[0].weight.device  # a model split over devices: the statistics meet on one
        return tasks, torch.stack([weight_stats(t.layer, t.weight, t.rows).to(device) for t in tasks])
    from nvfp4_qat.kernels import fake_quant as fq

    done: list[SweepTask] = []
    chunks: dict[torch.dtype, list[int]] = {}  # the open chunk of each dtype: indices into done
    parts, programs, order = [], [], []

    def launch(chunk: list[int]) -> None:
        # On the caller's stream. Spread over the sweep's streams (round robin, a side stream
        # waiting for the caller's before each chunk), recalibrate took longer and varied more:
        # medians 51.4-55.3 against 50.2-51.5 ms (H200, BENCHMARKS.md, session 11).
        weights, states = [done[i].weight for i in chunk], [_state(done[i]) for i in chunk]
        partials, n = fq.stats_partials(weights, states)
        parts.append(partials)
        programs.extend(n)
        order.extend(chunk)

    for task in tasks:
        done.append(task)
        chunk = chunks.setdefault(task.weight.dtype, [])
        chunk.append(len(done) - 1)
        if len(chunk) == STATS_CHUNK:
            launch(chunks.pop(task.weight.dtype))
    for chunk in chunks.values():
        launch(chunk)
    # One reduction for all chunks, after the last: per chunk, its host time (a launch and a copy of
    # the segment bounds) delayed the next stats launch, which the GPU waited for.
    partials = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    stats = fq.segment_totals(partials, programs, max_row=1)  # max: NaN wins
    if order == list(range(len(done))):  # one dtype: the chunks are in order
        return done, stats
    index = on_device(order, torch.int64, stats.device)
    return done, torch.empty_like(stats).index_copy_(0, index, stats)


def _state(task: SweepTask) -> tuple[torch.Tensor, torch.Tensor]:
    # The fake-quant kernel's cached (bytes, table) of the layer's current scales, its rows only.
    codes, table = task.layer.prepared_kernel_state()  # the fused plan checked the backend
    if task.rows is not None:
        codes = codes.reshape(task.layer.block_amax.shape)[task.rows].reshape(-1)
    return codes, table


def sweep(tasks: list[SweepTask], g: torch.Tensor, method: str, backend: str, fused: bool) -> SweepOutput:
    """Sweep every task with global amax ``g[i]`` and write its layer's ``block_amax`` rows in place.

    A task whose ``g[i]`` is NaN is left alone (its statistics are then meaningless). Writes no
    ``global_amax``. ``backend`` is the resolved sweep backend (the fused path is Triton).
    """
    if not tasks:  # a rank with nothing to sweep
        empty = torch.zeros(0, dtype=torch.float32, device=g.device)
        return SweepOutput(empty, empty, LayerClock(torch.device("cpu")))
    return _sweep_fused(tasks, g, method) if fused else _sweep_generic(tasks, g, method, backend)


def _sweep_generic(tasks: list[SweepTask], g: torch.Tensor, method: str, backend: str) -> SweepOutput:
    live = torch.isfinite(g).tolist()  # one host sync: then the skipped tasks cost nothing
    clock, sse, changed = LayerClock(g.device), [], []
    zero = torch.zeros((), dtype=torch.float32, device=g.device)
    for task, ok, g_i in zip(tasks, live, g.unbind(), strict=True):
        s, n = zero, zero
        if ok:
            s, n = _sweep_one(task, g_i, method, backend)
        sse.append(s.to(zero.device).to(torch.float32))
        changed.append(n.to(zero.device).to(torch.float32))
        clock.mark()
    return SweepOutput(torch.stack(sse), torch.stack(changed), clock)


def _sweep_one(
    task: SweepTask, g: torch.Tensor, method: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task on the generic path: ``(sse_after, n_changed)`` 0-dim, the scales written in place."""
    x, old = task.weight, scale_codes(task.layer, task.rows)
    g = g.to(x.device)
    if backend == "triton":
        from nvfp4_qat.kernels.sweep import launch_sweep

        # The old bytes were read above, before the kernel overwrites the scales (same stream).
        _, _, (_, part) = launch_sweep(x, g, method, stats=True, buffers={"old": old, "out": task.out})
        torch.autograd.graph.increment_version(task.layer.block_amax)  # written by a kernel
        return part[0].sum(), part[1].sum()
    out = sweep_reference(x, g, BLOCK_SIZE)
    codes = block_code_bytes(out, global_scale(g))
    xf = x.to(torch.float32)
    sse = (fake_quantize_unchecked(xf, out, g, BLOCK_SIZE) - xf).square().sum()
    task.out.copy_(out)
    return sse, (codes != old).sum()


def _sweep_fused(tasks: list[SweepTask], g: torch.Tensor, method: str) -> SweepOutput:
    from nvfp4_qat.kernels import fake_quant as fq
    from nvfp4_qat.kernels.sweep import STATS_ROWS, launch_sweep, stats_slots, sweep_tables, words_pass

    device = g.device
    n_blocks = [t.n_blocks for t in tasks]
    codes = torch.empty(sum(n_blocks), dtype=torch.uint8, device=device)  # kept by the layers' caches
    slots = [stats_slots(n) for n in n_blocks]
    partials = torch.zeros(STATS_ROWS, sum(slots), dtype=torch.float32, device=device)
    counts = torch.zeros(len(tasks), dtype=torch.int32, device=device)
    # The bf16 pass's tables of every task in one launch (launch_sweep would make one per task),
    # before the clock starts: its ~17 us are in no layer's seconds.
    tables = sweep_tables(g.view(-1)) if any(words_pass(t.weight, method) for t in tasks) else None
    streams = _sweep_streams(device)  # [None] off CUDA (Triton's interpreter)
    main, several = streams[0], len(streams) > 1
    for s in streams[1:]:
        s.wait_stream(main)  # g, the tables and the zeroed buffers first
    work = [torch.empty(max(n_blocks), dtype=torch.int32, device=device) for _ in streams]  # scratch
    clocks = [LayerClock(device, s) for s in streams]
    g_rows = g.view(-1, 1).unbind()
    start = col = 0
    # torch.cuda.set_stream also makes the stream's device current: launch_device restores the
    # caller's device on the way out (a model on another GPU than the current one).
    with launch_device(device):
        try:
            for i, (task, g_i, n, k) in enumerate(zip(tasks, g_rows, n_blocks, slots, strict=True)):
                j = i % len(streams)
                if several:
                    torch.cuda.set_stream(streams[j])
                buffers = {
                    "out": task.out,  # written in place by the kernel (not at all if g_i is NaN)
                    "codes": codes[start : start + n],
                    "old": _state(task)[0],  # the stale scales' bytes, cached
                    "partials": partials[:, col : col + k],
                    "count": counts[i : i + 1],
                    "work": work[j],
                }
                if tables is not None:
                    buffers["table"] = tables[i]
                launch_sweep(task.weight, g_i, method, stats=True, buffers=buffers)
                torch.autograd.graph.increment_version(buffers["out"])  # a kernel wrote it
                start, col = start + n, col + k
                clocks[j].mark()
        finally:
            if several:
                torch.cuda.set_stream(main)
                # Also when a launch raised: the buffers are freed to main's pool on the way out,
                # so main must not reuse them before the side streams' queued work is done.
                for s in streams[1:]:
                    main.wait_stream(s)
    sse_after, changed = fq.segment_totals(partials[:2], slots).unbind(1)  # row 2 (max |x|): unused
    return SweepOutput(sse_after, changed, _Interleaved(clocks, len(tasks)), codes)


_side_streams: dict[tuple[torch.device, int], list[torch.cuda.Stream]] = {}


def _sweep_streams(device: torch.device) -> list[torch.cuda.Stream | None]:
    """The current stream of ``device`` and its side streams (made once per device and priority,
    the current stream's: a high-priority caller keeps its priority); ``[None]`` off CUDA."""
    if device.type != "cuda":
        return [None]
    main = torch.cuda.current_stream(device)
    side = _side_streams.setdefault((main.device, main.priority), [])
    while len(side) < SWEEP_STREAMS - 1:
        side.append(torch.cuda.Stream(main.device, priority=main.priority))
    return [main, *side[: SWEEP_STREAMS - 1]]


class _Interleaved:
    """The per-task intervals of round-robin streams, in task order. With several streams, a task's
    interval is the time from the previous task of its stream to its own end, which may overlap
    the other streams' work."""

    def __init__(self, clocks: list[LayerClock], n_tasks: int) -> None:
        self._clocks, self._n = clocks, n_tasks

    def seconds(self) -> list[float]:
        # In task order, so that the streams' intervals are read as their tasks end (one clock
        # after the other, the second's were all read after the GPU was done, while the caller waited).
        per = [c.intervals() for c in self._clocks]
        return [next(per[i % len(per)]) for i in range(self._n)]


def install_kernel_states(pairs: list[tuple[NVFP4Linear, torch.Tensor]]) -> None:
    """Fused path: give each ``(layer, bytes)`` the fake-quant kernel's state of its new scales: the
    sweep's FP8 bytes of the whole ``block_amax`` and the decision table of the new global scale
    (all tables in one batch), so that the next forward (or recalibration) need not prepare them.

    Call after the layers' ``global_amax`` holds the new value, for layers that were written."""
    if not pairs:
        return
    device = pairs[0][1].device
    g = torch.stack([layer.quant_tensors()[2] for layer, _ in pairs])
    divisor = torch.full((), GLOBAL_SCALE_DIVISOR, dtype=torch.float32, device=device)
    tables = decision_table(g / divisor).reshape(len(pairs), -1)  # format.global_scale, batched
    for (layer, codes), table in zip(pairs, tables, strict=True):
        layer.set_kernel_state(codes, table)
