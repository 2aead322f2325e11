"""``recalibrate``: refresh the static NVFP4 scales of every ``NVFP4Linear`` from its current weight.

For each layer: ``global_amax = max |w|``, then the exact MSE sweep over the 126 FP8 codes
(:func:`~nvfp4_qat.nvfp4_scale_sweep`) gives the new ``block_amax``; both are written in place
with ``copy_`` so that every reference (optimizer, DDP bucket, FSDP, a compiled graph) keeps
seeing the same tensors. The report compares the weight error with the stale and the new scales.

The per-layer pieces (:func:`weight_sse`, :func:`compute_scales`, :func:`recalibrate_layer`) are
public for the Lightning callback and the metrics, which split layers across ranks.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from nvfp4_qat._validation import BACKENDS, METHODS, check_choice
from nvfp4_qat.format import block_codes, global_scale
from nvfp4_qat.modules import NVFP4Linear, fake_quant_sse
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.sweep import nvfp4_scale_sweep

__all__ = [
    "LayerRecalibration",
    "ON_NONFINITE",
    "RecalibrationReport",
    "compute_scales",
    "recalibrate",
    "recalibrate_layer",
    "weight_sse",
]

ON_NONFINITE = ("raise", "skip", "warn")


def full_weight(layer: NVFP4Linear) -> torch.Tensor:
    """The layer's whole weight, detached. FSDP2 shards weights as ``DTensor`` but not the scale
    buffers, so the sweep needs the gathered tensor (a collective: every rank must call this)."""
    w = layer.weight.detach()
    gather = getattr(w, "full_tensor", None)  # only DTensor has it
    return gather() if callable(gather) else w


def weight_sse(layer: NVFP4Linear) -> tuple[torch.Tensor, int]:
    """Sum of squared weight error of the fake-quant at the layer's current scales.

    Returns:
        ``(sse, numel)``: a 0-dim fp32 tensor on the weight's device (no host sync) and the
        number of weights.
    """
    with torch.no_grad():
        w = full_weight(layer)
        return fake_quant_sse(w, layer.block_amax, layer.global_amax), w.numel()


def compute_scales(
    layer: NVFP4Linear, backend: str = "auto", method: str = "pruned"
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(global_amax [], block_amax [out, in // 16])`` for the layer's current weight; writes nothing.

    Raises:
        ValueError: non-finite weights (from the sweep), bad ``backend`` or ``method``.
    """
    with torch.no_grad():
        return _scales(full_weight(layer), layer, backend, method)


def _scales(
    w: torch.Tensor, layer: NVFP4Linear, backend: str, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.linalg.vector_norm(w, float("inf")).to(torch.float32)  # max |w|, no |w| temporary
    block = nvfp4_scale_sweep(w, g, backend=backend, method=method)
    return g, block.reshape(layer.block_amax.shape)


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
        return self.numel // 16


def recalibrate_layer(
    name: str,
    layer: NVFP4Linear,
    backend: str = "auto",
    method: str = "pruned",
    sse_before: torch.Tensor | None = None,
) -> LayerRecalibration:
    """Recalibrate one layer in place (``copy_`` into its buffers) and describe the change.

    Args:
        name: the layer's name, for the report.
        layer: the layer; its weight must be finite (the sweep raises otherwise).
        backend, method: sweep settings, as :func:`recalibrate`.
        sse_before: the weight SSE at the current scales if already computed (:func:`weight_sse`).

    Returns:
        The report row. ``seconds`` covers this call, host syncs included.
    """
    start = time.perf_counter()
    with torch.no_grad():
        w = full_weight(layer)
        g_old, b_old = layer.global_amax.clone(), layer.block_amax.clone()
        if sse_before is None:
            sse_before = fake_quant_sse(w, b_old, g_old)
        g_new, b_new = _scales(w, layer, backend, method)
        layer.global_amax.copy_(g_new)
        layer.block_amax.copy_(b_new)
        sse_after = fake_quant_sse(w, layer.block_amax, layer.global_amax)
        codes_old = block_codes(b_old, global_scale(g_old))
        changed = (block_codes(b_new, global_scale(g_new)) != codes_old).sum()
        # One host sync per layer (float64 keeps the block count exact).
        energy = torch.linalg.vector_norm(w, dtype=torch.float32).square()
        values = torch.stack([t.to(torch.float64) for t in (sse_before, sse_after, changed, g_old, g_new, energy)])
        before, after, n_changed, amax_before, amax_after, energy = values.tolist()
        numel = w.numel()
        return LayerRecalibration(
            name=name,
            numel=numel,
            sse_before=before,
            sse_after=after,
            mse_before=before / numel,
            mse_after=after / numel,
            changed_fraction=n_changed / codes_old.numel(),
            global_amax_before=amax_before,
            global_amax_after=amax_after,
            seconds=time.perf_counter() - start,
            energy=energy,
        )


def _skipped_row(name: str, layer: NVFP4Linear) -> LayerRecalibration:
    g = float(layer.global_amax)
    nan = float("nan")
    return LayerRecalibration(name, layer.weight.numel(), nan, nan, nan, nan, 0.0, g, g, 0.0, True)


@dataclass
class RecalibrationReport:
    """Result of :func:`recalibrate`: one row per ``NVFP4Linear`` and totals over the rows that
    were not skipped (errors weighted by elements, ``changed_fraction`` by blocks)."""

    layers: list[LayerRecalibration] = field(default_factory=list)
    seconds: float = 0.0

    def _done(self) -> list[LayerRecalibration]:
        return [r for r in self.layers if not r.skipped]

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self._done())

    @property
    def n_blocks(self) -> int:
        return sum(r.n_blocks for r in self._done())

    @property
    def mse_before(self) -> float:
        return sum(r.sse_before for r in self._done()) / self.numel if self.numel else float("nan")

    @property
    def mse_after(self) -> float:
        return sum(r.sse_after for r in self._done()) / self.numel if self.numel else float("nan")

    @property
    def changed_fraction(self) -> float:
        blocks = self.n_blocks
        return sum(r.changed_fraction * r.n_blocks for r in self._done()) / blocks if blocks else 0.0

    @property
    def n_skipped(self) -> int:
        return sum(r.skipped for r in self.layers)

    def __str__(self) -> str:
        width = min(48, max([len(r.name) for r in self.layers] + [5]))
        head = (
            f"{'layer':<{width}} {'numel':>11} {'MSE before':>11} {'MSE after':>11} {'change':>7} "
            f"{'changed':>7} {'amax before':>11} {'amax after':>11} {'seconds':>8}"
        )
        lines = [
            f"NVFP4 recalibration: {len(self.layers)} layers ({self.n_skipped} skipped), "
            f"{self.numel:,} weights, {self.seconds:.3f} s",
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


def recalibrate(
    model: nn.Module, backend: str = "auto", method: str = "pruned", on_nonfinite: str = "raise"
) -> RecalibrationReport:
    """Recompute the scales of every ``NVFP4Linear`` in ``model`` from its current weight.

    Runs under ``torch.no_grad()``; writes ``global_amax`` and ``block_amax`` in place (same
    storage); never touches parameters, gradients, ``requires_grad`` or an optimizer.

    Args:
        model: a model prepared by :func:`~nvfp4_qat.quantize_model` (or holding ``NVFP4Linear``).
        backend: sweep backend, ``"auto"``, ``"triton"`` or ``"reference"``.
        method: sweep method, ``"pruned"`` or ``"exhaustive"`` (same result).
        on_nonfinite: a layer with NaN/Inf weights: ``"raise"`` a ``ValueError`` naming it, before
            any scale is written; ``"skip"`` it (its scales are kept, its row marked skipped); or
            ``"warn"``: skip it and emit one warning naming the skipped layers.

    Returns:
        A :class:`RecalibrationReport` (``print`` it for a table).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: bad ``backend``/``method``/``on_nonfinite``, a model without ``NVFP4Linear``
            layers, or non-finite weights with ``on_nonfinite="raise"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(backend, BACKENDS, "backend")
    check_choice(method, METHODS, "method")
    check_choice(on_nonfinite, ON_NONFINITE, "on_nonfinite")
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("model holds no NVFP4Linear layers; prepare it with quantize_model() first")
    start = time.perf_counter()
    with torch.no_grad():
        # The error at the stale scales is needed for the report anyway; a non-finite weight makes
        # it NaN/Inf, so it doubles as the finiteness check (one host sync for all layers), done
        # before any scale is written so that "raise" leaves the model untouched.
        before = [weight_sse(m)[0] for _, m in layers]
        suspect = (~torch.isfinite(torch.stack([t.to(before[0].device) for t in before]))).tolist()
        # An Inf SSE can also come from huge finite weights (squares beyond fp32): check those exactly.
        finite = [
            not s or bool(torch.isfinite(full_weight(m)).all())
            for s, (_, m) in zip(suspect, layers, strict=True)
        ]
        bad = [name for (name, _), ok in zip(layers, finite, strict=True) if not ok]
        if bad and on_nonfinite == "raise":
            raise ValueError(
                f"non-finite (NaN/Inf) weights in layer {bad[0]!r}"
                + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                + "; no scale was changed (pass on_nonfinite='skip' or 'warn' to keep their old scales)"
            )
        if bad and on_nonfinite == "warn":
            warnings.warn(
                f"recalibrate skipped {len(bad)} layer(s) with non-finite weights, scales kept: {bad}",
                stacklevel=2,
            )
        rows = [
            recalibrate_layer(name, m, backend, method, sse) if ok else _skipped_row(name, m)
            for (name, m), ok, sse in zip(layers, finite, before, strict=True)
        ]
    return RecalibrationReport(layers=rows, seconds=time.perf_counter() - start)
