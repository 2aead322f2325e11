"""What a recalibration reports: the record every execution path fills, the rows, the report.

Every path (generic, fused GPU, distributed, a policy's scorer) measures the same six things per
layer and fills one :class:`LayerStats` with them, as tensors on the device (no host sync while
the work is queued); they come back to the host at once, and :func:`build_rows` builds the
:class:`LayerRecalibration` rows from them by field name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nvfp4_qat.format import BLOCK_SIZE

__all__ = ["LayerRecalibration", "LayerStats", "RecalibrationReport", "build_rows"]


class LayerStats(NamedTuple):
    """One recalibration's measurements of a layer (or, field by field, of many: ``[L]`` tensors).

    Sums, so that a row-sharded layer's parts add up over the ranks. The errors are the summed
    squared NVFP4 error in fp32 (what the sweep minimises).
    """

    sse_before: torch.Tensor  # at the old scales
    sse_after: torch.Tensor  # at the new scales
    n_changed: torch.Tensor  # blocks whose FP8 code changed
    energy: torch.Tensor  # sum(w^2), for the SQNR metric
    amax_before: torch.Tensor  # global amax, old
    amax_after: torch.Tensor  # global amax, new

    def to_tensor(self) -> torch.Tensor:
        """float64 ``[6, ...]``, fields in order (for one read-back or one all-reduce)."""
        return torch.stack([t.to(torch.float64) for t in self])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> LayerStats:
        """Inverse of :meth:`to_tensor`."""
        return cls(*t.unbind(0))


@dataclass(frozen=True)
class LayerRecalibration:
    """One layer's recalibration. ``changed_fraction`` is the fraction of blocks whose FP8 code
    (:func:`~nvfp4_qat.format.block_codes`) differs between old and new scales. A skipped layer
    (non-finite weights) kept its scales and carries NaN errors."""

    name: str
    numel: int
    sse_before: float
    sse_after: float
    mse_before: float
    mse_after: float
    changed_fraction: float
    global_amax_before: float
    global_amax_after: float
    seconds: float
    skipped: bool = False
    energy: float = float("nan")  # sum(w^2), for the SQNR metric

    @property
    def n_blocks(self) -> int:
        return self.numel // BLOCK_SIZE

    @classmethod
    def from_stats(cls, name: str, numel: int, stats: LayerStats, seconds: float) -> LayerRecalibration:
        """The row of a layer from its :class:`LayerStats` (fields as Python floats)."""
        s = stats
        # Every field set at once, without the frozen dataclass's __init__ (one object.__setattr__
        # per field): 1.8 against 6.0 us a row, and the rows of a model are built after the GPU is
        # done, while the caller waits (0.9 ms for 224 layers on a 2-core VM). Equal and
        # hash-equal to the row __init__ makes (tests/test_engine_paths.py).
        row = object.__new__(cls)
        row.__dict__.update(
            name=name,
            numel=numel,
            sse_before=s.sse_before,
            sse_after=s.sse_after,
            mse_before=s.sse_before / numel,
            mse_after=s.sse_after / numel,
            changed_fraction=s.n_changed / (numel // BLOCK_SIZE),
            global_amax_before=s.amax_before,
            global_amax_after=s.amax_after,
            seconds=seconds,
            skipped=False,
            energy=s.energy,
        )
        return row

    @classmethod
    def skipped_row(cls, name: str, numel: int, global_amax: float) -> LayerRecalibration:
        """A layer skipped for non-finite weights: scales kept, NaN errors."""
        nan = float("nan")
        return cls(name, numel, nan, nan, nan, nan, 0.0, global_amax, global_amax, 0.0, skipped=True)

    def unchanged(self) -> LayerRecalibration:
        """This row for a layer that kept its old scales (a loss check rejected the new ones)."""
        if self.skipped:
            return self
        return dataclasses.replace(
            self,
            sse_after=self.sse_before,
            mse_after=self.mse_before,
            changed_fraction=0.0,
            global_amax_after=self.global_amax_before,
        )


def build_rows(
    layers: list[tuple[str, torch.nn.Module]],
    values: list[list[float]],
    done: list[bool],
    seconds: list[float],
) -> list[LayerRecalibration]:
    """The report rows from every layer's :class:`LayerStats` values, read back at once.

    Args:
        layers: ``(name, NVFP4Linear)`` pairs.
        values: per layer, its six :class:`LayerStats` fields as floats (``stats.to_tensor().T``
            read back); meaningless where the layer was not done.
        done: per layer, whether it was recalibrated (``False``: skipped, non-finite weights).
        seconds: per layer.
    """
    rows = []
    for (name, m), ok, v, t in zip(layers, done, values, seconds, strict=True):
        numel = m.quant_tensors()[0].numel()
        if ok:
            rows.append(LayerRecalibration.from_stats(name, numel, LayerStats(*v), t))
        else:
            rows.append(LayerRecalibration.skipped_row(name, numel, float(m.global_amax)))
    return rows


#: From how many seconds of compiling the report's summary line mentions it (issue 17: the first
#: recalibration's compile cost is to stay below 1 s with a warm Triton cache, said when larger).
COMPILE_NOTE_SECONDS = 1.0


@dataclass
class RecalibrationReport:
    """Result of :func:`~nvfp4_qat.recalibrate`: one row per ``NVFP4Linear`` and totals over the
    rows that were not skipped (errors weighted by elements, ``changed_fraction`` by blocks)."""

    layers: list[LayerRecalibration] = field(default_factory=list)
    seconds: float = 0.0
    #: Seconds of ``seconds`` spent compiling or loading Triton kernels (a process's first call):
    #: the summary line names it from :data:`COMPILE_NOTE_SECONDS` up.
    compile_seconds: float = 0.0
    #: The held-out loss before and after (policies with ``loss_check``; NaN otherwise).
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    #: Whether the loss check rolled the new scales back (every layer kept its old scales).
    rolled_back: bool = False
    #: The layers whose new scales the loss check rejected: they kept their old scales, and their
    #: rows say so (error after = error before, nothing changed).
    rolled_back_layers: tuple[str, ...] = ()
    #: How it ran (:class:`~nvfp4_qat.recalibration.RecalibrationPlan`): ``"fused"`` (the GPU fast
    #: path), ``"generic"`` or ``"policy"``, with ``"distributed-"`` in front when split across ranks.
    execution: str = ""
    #: The sweep backend it used (``"triton"`` or ``"reference"``) and the layers' fake-quant backend.
    backend: str = ""
    fake_quant_backend: str = ""

    def _done(self) -> list[LayerRecalibration]:
        return [r for r in self.layers if not r.skipped]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self._done())

    @property
    def n_blocks(self) -> int:
        return sum(r.n_blocks for r in self._done())

    @property
    def sse_before(self) -> float:
        return sum(r.sse_before for r in self._done())

    @property
    def sse_after(self) -> float:
        return sum(r.sse_after for r in self._done())

    @property
    def energy(self) -> float:
        return sum(r.energy for r in self._done())

    @property
    def mse_before(self) -> float:
        return self.sse_before / self.numel if self.numel else float("nan")

    @property
    def mse_after(self) -> float:
        return self.sse_after / self.numel if self.numel else float("nan")

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio ``10 log10(energy / sse_after)`` in dB (``inf`` if 0)."""
        sse = self.sse_after
        return 10.0 * math.log10(self.energy / sse) if sse > 0 else math.inf

    @property
    def n_changed(self) -> int:
        return sum(round(r.changed_fraction * r.n_blocks) for r in self._done())

    @property
    def changed_fraction(self) -> float:
        blocks = self.n_blocks
        return self.n_changed / blocks if blocks else 0.0

    @property
    def n_skipped(self) -> int:
        return sum(r.skipped for r in self.layers)

    @property
    def compile_note(self) -> str:
        """``" (2.9 s of it compiling or loading Triton kernels: ...)"`` from a second up, else ``""``."""
        if self.compile_seconds < COMPILE_NOTE_SECONDS:
            return ""
        return (
            f" ({self.compile_seconds:.1f} s of it compiling or loading Triton kernels: "
            "a process's first call, not the steady cost)"
        )

    def __str__(self) -> str:
        width = min(48, max([len(r.name) for r in self.layers] + [5]))
        head = (
            f"{'layer':<{width}} {'numel':>11} {'MSE before':>11} {'MSE after':>11} {'change':>7} "
            f"{'changed':>7} {'amax before':>11} {'amax after':>11} {'seconds':>8}"
        )
        how = f" [{self.execution}, sweep {self.backend}]" if self.execution else ""
        lines = [
            f"NVFP4 recalibration: {len(self.layers)} layers ({self.n_skipped} skipped), "
            f"{self.numel:,} weights, {self.seconds:.3f} s{how}{self.compile_note}",
            head,
            "-" * len(head),
        ]
        for r in self.layers:
            name = r.name if len(r.name) <= width else "..." + r.name[-(width - 3) :]
            if r.skipped:
                lines.append(f"{name:<{width}} {r.numel:>11,} skipped: non-finite weights, scales kept")
                continue
            lines.append(
                f"{name:<{width}} {r.numel:>11,} {r.mse_before:>11.4e} {r.mse_after:>11.4e} "
                f"{_change(r.mse_before, r.mse_after):>7} {100 * r.changed_fraction:>6.1f}% "
                f"{r.global_amax_before:>11.4e} {r.global_amax_after:>11.4e} {r.seconds:>8.3f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<{width}} {self.numel:>11,} {self.mse_before:>11.4e} {self.mse_after:>11.4e} "
            f"{_change(self.mse_before, self.mse_after):>7} {100 * self.changed_fraction:>6.1f}% "
            f"{'':>11} {'':>11} {self.seconds:>8.3f}"
        )
        return "\n".join(lines)


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before > 0 else "n/a"
