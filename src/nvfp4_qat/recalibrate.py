"""``recalibrate``: refresh the static NVFP4 scales of every ``NVFP4Linear`` from its current weight.

For each layer: ``global_amax = max |w|``, then the exact MSE sweep over the 126 FP8 codes
(:func:`~nvfp4_qat.nvfp4_scale_sweep`'s kernel) gives the new ``block_amax``; both are written in place
with ``copy_`` so that every reference (optimizer, DDP bucket, FSDP, a compiled graph) keeps
seeing the same tensors. The report compares the weight error with the stale and the new scales.

That is the plain ``"mse"`` policy (fused GPU path, or the generic one). Any other
:class:`~nvfp4_qat.policy.RecalibrationPolicy` runs through :func:`recalibrate_policy` (PyTorch, any
device), and a policy's loss check (whole model or per layer) wraps either path.

The per-layer pieces (:func:`weight_sse`, :func:`compute_scales`, :func:`recalibrate_layer`) and
the helpers (argument checks, finiteness check, non-finite policy, change statistics) are shared
with :mod:`nvfp4_qat.distributed`, which splits the same work across ranks.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nvfp4_qat._validation import BACKENDS, METHODS, check_choice
from nvfp4_qat.format import block_code_bytes, global_scale
from nvfp4_qat.modules import NVFP4Linear, quant_error_stats
from nvfp4_qat.policy import (
    InputMoments,
    RecalibrationPolicy,
    adam_moments,
    adam_state,
    policy_scales,
    resolve_policy,
)
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.sweep import nvfp4_scale_sweep, sweep_with_stats

__all__ = [
    "LayerClock",
    "LayerRecalibration",
    "ON_NONFINITE",
    "RecalibrationReport",
    "apply_nonfinite_policy",
    "change_stats",
    "checked_layers",
    "clock_device",
    "compute_scales",
    "finite_flags",
    "full_weight",
    "recalibrate",
    "recalibrate_layer",
    "scale_codes",
    "skipped_row",
    "update_layer",
    "weight_sse",
    "weight_stats",
]

#: ``on_nonfinite`` values: ``"raise"`` (nothing written) or ``"skip"`` (that layer keeps its scales; warns).
ON_NONFINITE = ("raise", "skip")


def full_weight(layer: NVFP4Linear) -> torch.Tensor:
    """The layer's whole weight, detached. FSDP2 shards weights as ``DTensor`` but not the scale
    buffers, so the sweep needs the gathered tensor (a collective: every rank must call this)."""
    w = layer.weight.detach()
    gather = getattr(w, "full_tensor", None)  # only DTensor has it
    return gather() if callable(gather) else w


def weight_stats(
    layer: NVFP4Linear, w: torch.Tensor | None = None, rows: slice | None = None
) -> torch.Tensor:
    """``[sse, max |w|, sum w^2]`` (fp32, no host sync) of the layer's weight at its current scales.

    ``sse`` is the summed squared NVFP4 error in fp32 (:func:`~nvfp4_qat.modules.quant_error_stats`),
    what the sweep minimises. One read of the weight on a GPU.

    Args:
        layer: the layer.
        w: the weight to measure (default: :func:`full_weight`); with ``rows``, those rows only.
        rows: the rows of the layer that ``w`` holds (a row shard), to pick their scales.
    """
    with torch.no_grad():
        w = full_weight(layer) if w is None else w
        if rows is None:
            state = layer.kernel_state(w)
            return quant_error_stats(w, layer.block_amax, layer.global_amax, layer.fake_quant_backend, state)
        return quant_error_stats(w, layer.block_amax[rows], layer.global_amax, layer.fake_quant_backend)


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


def compute_scales(
    layer: NVFP4Linear, backend: str = "auto", method: str = "pruned"
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(global_amax [], block_amax [out, in // 16])`` for the layer's current weight; writes nothing.

    Raises:
        ValueError: non-finite weights, bad ``backend`` or ``method`` (the public sweep checks them).
    """
    with torch.no_grad():
        w = full_weight(layer)
        g = torch.linalg.vector_norm(w, float("inf")).to(torch.float32)
        return g, nvfp4_scale_sweep(w, g, backend=backend, method=method).reshape(layer.block_amax.shape)


def change_stats(before: torch.Tensor, sse_after: torch.Tensor, n_changed: torch.Tensor) -> torch.Tensor:
    """``[sse_before, sse_after, n_changed_blocks, energy]`` float64 (no host sync).

    ``before`` is :func:`weight_stats` at the old scales (``[sse, amax, energy]``), ``sse_after``
    and ``n_changed`` come from :func:`~nvfp4_qat.sweep.sweep_with_stats`. Sums, so that row shards
    add up.
    """
    return torch.stack([t.to(torch.float64) for t in (before[0], sse_after, n_changed, before[2])])


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

    @classmethod
    def from_stats(cls, name: str, numel: int, *stats: float) -> LayerRecalibration:
        """The row from ``stats`` = :func:`change_stats`' four sums (``sse_before, sse_after,
        n_changed, energy``), then ``global_amax`` before and after, then the seconds."""
        sse_before, sse_after, n_changed, energy, amax_before, amax_after, seconds = stats
        return cls(
            name, numel, sse_before, sse_after, sse_before / numel, sse_after / numel,
            n_changed / (numel // 16), amax_before, amax_after, seconds, energy=energy,
        )  # fmt: skip


def update_layer(
    w: torch.Tensor, layer: NVFP4Linear, backend: str, method: str, before: torch.Tensor | None = None
) -> torch.Tensor:
    """Sweep ``w`` (the layer's full weight) and write the new scales in place; no host sync.

    Args:
        w: the layer's full weight (finite).
        layer: the layer.
        backend, method: sweep settings.
        before: :func:`weight_stats` of ``w`` at the current scales, if the caller has it (its
            ``max |w|`` is the new global amax). Computed here otherwise.

    Returns:
        float64 ``[6]`` on the weight's device: :func:`change_stats`' four sums, then the global
        amax before and after.
    """
    before = weight_stats(layer, w) if before is None else before
    g_new = before[1].clone()  # max |w|: exact, whatever the order of the reduction
    # The old bytes are read before the in-place writes below (same stream).
    b_new, _, sse_after, n_changed = sweep_with_stats(w, g_new, backend, method, scale_codes(layer))
    stats = change_stats(before, sse_after, n_changed)
    amax = torch.stack([layer.global_amax, g_new]).to(torch.float64)
    layer.global_amax.copy_(g_new)
    layer.block_amax.copy_(b_new.reshape(layer.block_amax.shape))
    return torch.cat([stats, amax])


class LayerClock:
    """Per-layer times without a host sync per layer: CUDA events on a GPU, ``perf_counter`` else.

    Call :meth:`mark` after each layer's work is queued, :meth:`seconds` once at the end. On a GPU
    the intervals are device time between the marks; elsewhere (the work is synchronous) wall time.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device if device.type == "cuda" else None
        self._marks: list = []
        self.mark()

    def mark(self) -> None:
        if self._device is None:
            self._marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        self._marks.append(event)

    def seconds(self) -> list[float]:
        """The intervals between consecutive marks (waits for the last one)."""
        if self._device is None:
            return [b - a for a, b in itertools.pairwise(self._marks)]
        self._marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self._marks)]


def clock_device(layers: list[tuple[str, NVFP4Linear]]) -> torch.device:
    """The GPU that holds every layer's scales, for :class:`LayerClock`; else the CPU (wall time)."""
    devices = {m.block_amax.device for _, m in layers}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def recalibrate_layer(
    name: str,
    layer: NVFP4Linear,
    backend: str = "auto",
    method: str = "pruned",
    before: torch.Tensor | None = None,
) -> LayerRecalibration:
    """Recalibrate one layer in place (``copy_`` into its buffers) and describe the change.

    Args:
        name: the layer's name, for the report.
        layer: the layer.
        backend, method: sweep settings, as :func:`recalibrate`.
        before: :func:`weight_stats` at the current scales, if a caller computed it and checked
            with it that the weight is finite (:func:`finite_flags`). Otherwise both happen here.

    Returns:
        The report row. ``seconds`` covers this call, its host sync included.

    Raises:
        ValueError: non-finite weights (without ``sse_before``); no scale was changed.
    """
    start = time.perf_counter()
    with torch.no_grad():
        w = full_weight(layer)
        if before is None:
            before = weight_stats(layer, w)
            if not finite_flags([before[0]], lambda _: w)[0]:
                raise ValueError(f"non-finite (NaN/Inf) weights in layer {name!r}; no scale was changed")
        values = update_layer(w, layer, backend, method, before).tolist()  # float64: exact counts
        return LayerRecalibration.from_stats(name, w.numel(), *values, time.perf_counter() - start)


def skipped_row(name: str, layer: NVFP4Linear) -> LayerRecalibration:
    """The report row of a layer skipped for non-finite weights (scales kept, NaN errors)."""
    g = float(layer.global_amax)
    nan = float("nan")
    return LayerRecalibration(name, layer.weight.numel(), nan, nan, nan, nan, 0.0, g, g, 0.0, True)


@dataclass
class RecalibrationReport:
    """Result of :func:`recalibrate`: one row per ``NVFP4Linear`` and totals over the rows that
    were not skipped (errors weighted by elements, ``changed_fraction`` by blocks)."""

    layers: list[LayerRecalibration] = field(default_factory=list)
    seconds: float = 0.0
    #: The held-out loss before and after (policies with ``loss_check``; NaN otherwise).
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    #: Whether the loss check rolled the new scales back (every layer kept its old scales).
    rolled_back: bool = False
    #: The layers whose new scales the loss check rejected: they kept their old scales, and their
    #: rows say so (error after = error before, nothing changed).
    rolled_back_layers: tuple[str, ...] = ()

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


def finite_flags(sses: list[torch.Tensor | None], part: Callable[[int], torch.Tensor]) -> list[bool]:
    """Whether each checked tensor is finite, with one host sync in the common case.

    ``sses[i]`` is the fake-quant SSE of tensor ``i`` if already computed (``None``: not), and
    ``part(i)`` gives the tensor itself, fetched only when needed (it may be a gather). A non-finite
    weight makes its SSE NaN/Inf, so a finite SSE proves a finite tensor; the rest (an Inf SSE can
    also come from huge finite weights: squares beyond fp32) are checked exactly.
    """
    known = [s for s in sses if s is not None]
    suspect = (~torch.isfinite(torch.stack([s.to(known[0].device) for s in known]))).tolist() if known else []
    flags, k = [], 0
    for i, s in enumerate(sses):
        if s is not None:
            k += 1
            if not suspect[k - 1]:
                flags.append(True)
                continue
        t = part(i)
        flags.append(t.numel() == 0 or bool(torch.isfinite(t).all()))
    return flags


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
            stacklevel=3,
        )


def checked_layers(
    model: nn.Module, backend: str, method: str, on_nonfinite: str
) -> list[tuple[str, NVFP4Linear]]:
    """Validate :func:`recalibrate`'s arguments; return the model's ``NVFP4Linear`` layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(backend, BACKENDS, "backend")
    check_choice(method, METHODS, "method")
    check_choice(on_nonfinite, ON_NONFINITE, "on_nonfinite")
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("model holds no NVFP4Linear layers; prepare it with quantize_model() first")
    return layers


def recalibrate(
    model: nn.Module,
    backend: str = "auto",
    method: str = "pruned",
    on_nonfinite: str = "raise",
    policy: str | RecalibrationPolicy = "mse",
    optimizer: torch.optim.Optimizer | None = None,
    input_moments: InputMoments | None = None,
    evaluate: Callable[[], float] | None = None,
) -> RecalibrationReport:
    """Recompute the scales of every ``NVFP4Linear`` in ``model`` from its current weight.

    Runs under ``torch.no_grad()``; writes ``global_amax`` and ``block_amax`` in place (same
    storage); never touches parameters, gradients, ``requires_grad`` or an optimizer. The whole
    sweep runs in this process (FSDP2 weights are gathered); under ``torch.distributed``,
    :func:`~nvfp4_qat.distributed.recalibrate_distributed` splits it across the ranks.

    Args:
        model: a model prepared by :func:`~nvfp4_qat.quantize_model` (or holding ``NVFP4Linear``).
        backend: sweep backend, ``"auto"``, ``"triton"`` or ``"reference"`` (plain ``"mse"`` policy).
        method: sweep method, ``"pruned"`` or ``"exhaustive"`` (same result).
        on_nonfinite: a layer with NaN/Inf weights: ``"raise"`` a ``ValueError`` naming it, before
            any scale is written; or ``"skip"`` it: its scales are kept, its row is marked skipped,
            and one warning names the skipped layers.
        policy: a preset of :data:`~nvfp4_qat.policy.POLICIES` or a
            :class:`~nvfp4_qat.policy.RecalibrationPolicy`: how candidates are scored and which
            changes are kept. ``"mse"`` (the exact weight-MSE sweep) is the plain sweep.
        optimizer: the training optimizer (Adam/AdamW), for the ``gradient`` criterion.
        input_moments: the hooks' input statistics, for the ``activation`` criterion.
        evaluate: returns the held-out loss of the model as it is (in eval mode, no gradient),
            for policies with a ``loss_check``; called before and after the new scales (and,
            with ``loss_check="layer"``, once per layer whose scales changed).

    Returns:
        A :class:`RecalibrationReport` (``print`` it for a table). A row's ``seconds`` is the GPU
        time of that layer's work (CUDA events: the layers are queued without a host sync between
        them) or, on the CPU, its wall time.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``policy`` is neither a name nor a policy.
        ValueError: bad ``backend``/``method``/``on_nonfinite``/``policy``, a model without
            ``NVFP4Linear`` layers, non-finite weights with ``on_nonfinite="raise"``, or a policy
            whose input is missing (``optimizer``, ``input_moments``, ``evaluate``). Nothing was
            written then.
    """
    layers = checked_layers(model, backend, method, on_nonfinite)
    policy = resolve_policy(policy)
    check_policy_inputs(policy, layers, optimizer, input_moments, evaluate)
    start = time.perf_counter()
    with torch.no_grad():
        snapshot = scale_snapshot(layers) if policy.checks_loss else None
        loss_before = float(evaluate()) if policy.checks_loss else float("nan")
        fused = _fused_module()
        if not policy.is_plain_sweep:
            rows = recalibrate_policy(layers, policy, on_nonfinite, optimizer, input_moments)
        elif fused is not None and fused.fused_applicable(layers, backend):
            rows = _recalibrate_fused(fused, layers, method, on_nonfinite)
        else:
            rows = _recalibrate_generic(layers, backend, method, on_nonfinite)
        report = RecalibrationReport(layers=rows, loss_before=loss_before)
        if policy.loss_check == "model":
            report.loss_after = float(evaluate())
            if not report.loss_after <= loss_before:  # NaN rolls back too
                restore_scales(layers, snapshot)
                report.rolled_back_layers = tuple(name for name, _ in layers)
        elif policy.loss_check == "layer":
            report.loss_after, report.rolled_back_layers = _check_layers(
                layers, snapshot, evaluate, loss_before
            )
        report.rolled_back = bool(layers) and len(report.rolled_back_layers) == len(layers)
        if report.rolled_back_layers:  # the rows describe the scales the layers hold
            kept = set(report.rolled_back_layers)
            report.layers = [_unchanged(r) if r.name in kept else r for r in report.layers]
    report.seconds = time.perf_counter() - start
    return report


def check_policy_inputs(
    policy: RecalibrationPolicy,
    layers: list[tuple[str, NVFP4Linear]],
    optimizer: torch.optim.Optimizer | None,
    input_moments: InputMoments | None,
    evaluate: Callable[[], float] | None,
) -> None:
    """Refuse a policy whose inputs are missing, before anything is computed or written."""
    if policy.needs_optimizer:
        if optimizer is None:
            raise ValueError(
                "policy criterion 'gradient' needs the training optimizer (recalibrate(..., "
                "optimizer=opt)); outside training use policy='mse'"
            )
        for _, m in layers:
            adam_state(optimizer, m.weight)  # raises with a clear message; computes nothing
    if policy.needs_input_moments:
        if input_moments is None:
            raise ValueError(
                "policy criterion 'activation' needs input statistics: pass input_moments="
                "InputMoments(nvfp4_layers(model)) and run training forwards before recalibrating"
            )
        missing = [name for name, _ in layers if input_moments.get(name) is None]
        if missing:
            raise ValueError(
                f"policy criterion 'activation': no input statistics for layer {missing[0]!r}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + " (run training-mode forwards with the InputMoments hooks before recalibrating)"
            )
    if policy.checks_loss and not callable(evaluate):
        raise ValueError("a policy with loss_check needs evaluate=<callable returning the held-out loss>")


def _check_layers(
    layers: list[tuple[str, NVFP4Linear]],
    old: list[tuple[torch.Tensor, torch.Tensor]],
    evaluate: Callable[[], float],
    loss: float,
) -> tuple[float, tuple[str, ...]]:
    """Greedy per-layer loss check: from the old scales, try each layer's new ones in model order
    and keep them only where the held-out loss does not rise. Returns the final loss and the
    layers that kept their old scales."""
    new = scale_snapshot(layers)
    restore_scales(layers, old)
    rejected = []
    for i, (name, _) in enumerate(layers):
        if torch.equal(new[i][0], old[i][0]) and torch.equal(new[i][1], old[i][1]):
            continue  # nothing to try
        restore_scales([layers[i]], [new[i]])
        trial = float(evaluate())
        if trial <= loss:  # NaN is never <=: rejected
            loss = trial
        else:
            restore_scales([layers[i]], [old[i]])
            rejected.append(name)
    return loss, tuple(rejected)


def _unchanged(row: LayerRecalibration) -> LayerRecalibration:
    """``row`` for a layer that kept its old scales: the error after is the error before."""
    if row.skipped:
        return row
    return dataclasses.replace(
        row,
        sse_after=row.sse_before,
        mse_after=row.mse_before,
        changed_fraction=0.0,
        global_amax_after=row.global_amax_before,
    )


def scale_snapshot(layers: list[tuple[str, NVFP4Linear]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's ``(global_amax, block_amax)``, for :func:`restore_scales`."""
    return [(m.global_amax.clone(), m.block_amax.clone()) for _, m in layers]


def restore_scales(
    layers: list[tuple[str, NVFP4Linear]], snapshot: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Write a :func:`scale_snapshot` back in place (``copy_``: the same buffers)."""
    for (_, m), (g, b) in zip(layers, snapshot, strict=True):
        m.global_amax.copy_(g)
        m.block_amax.copy_(b)


def recalibrate_policy(
    layers: list[tuple[str, NVFP4Linear]],
    policy: RecalibrationPolicy,
    on_nonfinite: str,
    optimizer: torch.optim.Optimizer | None = None,
    input_moments: InputMoments | None = None,
) -> list[LayerRecalibration]:
    """Every layer's new scales under a policy other than the plain sweep (PyTorch, any device).

    All new scales are computed before the first is written, so an error leaves the model as it
    was. Each rank of a replicated model computes the same scales from the same inputs.
    """
    before = [weight_stats(m) for _, m in layers]
    finite = finite_flags([b[0] for b in before], lambda i: full_weight(layers[i][1]))
    apply_nonfinite_policy(
        [name for (name, _), ok in zip(layers, finite, strict=True) if not ok], on_nonfinite
    )
    new: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for (name, m), ok, stats in zip(layers, finite, before, strict=True):
        if not ok:
            new.append(None)
            continue
        w = full_weight(m)
        g_new = torch.maximum(m.global_amax, stats[1]) if policy.keep_global_amax else stats[1].clone()
        feature = input_moments.get(name) if policy.needs_input_moments else None
        moments = adam_moments(optimizer, m.weight) if policy.needs_optimizer else None
        new.append((g_new, policy_scales(w, m.block_amax, m.global_amax, g_new, policy, feature, moments)))
    rows = []
    for (name, m), stats, scales in zip(layers, before, new, strict=True):
        if scales is None:
            rows.append(skipped_row(name, m))
            continue
        start = time.perf_counter()
        old_codes, g_old = scale_codes(m), m.global_amax.clone()
        m.global_amax.copy_(scales[0])
        m.block_amax.copy_(scales[1])
        after = weight_stats(m)
        n_changed = (scale_codes(m) != old_codes).sum()
        values = torch.cat(
            [change_stats(stats, after[0], n_changed), torch.stack([g_old, scales[0]]).double()]
        )
        rows.append(
            LayerRecalibration.from_stats(
                name, m.weight.numel(), *values.tolist(), time.perf_counter() - start
            )
        )
    return rows


def _recalibrate_generic(
    layers: list[tuple[str, NVFP4Linear]], backend: str, method: str, on_nonfinite: str
) -> list[LayerRecalibration]:
    # The error at the stale scales is needed for the report anyway and doubles as the finiteness
    # check, done before any scale is written so that "raise" leaves the model as is. One read of
    # each weight gives it together with the new global amax and the energy.
    before = [weight_stats(m) for _, m in layers]
    finite = finite_flags([b[0] for b in before], lambda i: full_weight(layers[i][1]))
    apply_nonfinite_policy(
        [name for (name, _), ok in zip(layers, finite, strict=True) if not ok], on_nonfinite
    )
    # Queue every layer's work, then read all the statistics with one host sync: a sync per
    # layer would leave the GPU idle while the host prepares the next layer.
    clock, pending = LayerClock(clock_device(layers)), []
    for (_, m), ok, stats in zip(layers, finite, before, strict=True):
        if ok:
            pending.append(update_layer(full_weight(m), m, backend, method, stats))
        clock.mark()
    values = iter(torch.stack([t.to(pending[0].device) for t in pending]).tolist() if pending else [])
    seconds = clock.seconds()
    return [
        LayerRecalibration.from_stats(name, m.weight.numel(), *next(values), t)
        if ok
        else skipped_row(name, m)
        for (name, m), ok, t in zip(layers, finite, seconds, strict=True)
    ]


def _fused_module():
    """``nvfp4_qat._recalibrate_fused``, or ``None`` without triton (the generic path serves)."""
    try:
        from nvfp4_qat import _recalibrate_fused
    except ImportError:
        return None
    return _recalibrate_fused


def _recalibrate_fused(
    fused, layers: list[tuple[str, NVFP4Linear]], method: str, on_nonfinite: str
) -> list[LayerRecalibration]:
    # The same steps on the GPU fast path (see nvfp4_qat._recalibrate_fused): the scales are
    # bit-identical, the launches per layer few, and the only host sync comes at the end. With
    # "raise", a non-finite weight anywhere made the kernels skip every layer: nothing was written.
    values, finite, seconds = fused.recalibrate_all(layers, method, all_or_nothing=on_nonfinite == "raise")
    apply_nonfinite_policy(
        [name for (name, _), ok in zip(layers, finite, strict=True) if not ok], on_nonfinite
    )
    return [
        LayerRecalibration.from_stats(name, m.weight.numel(), *row, t) if ok else skipped_row(name, m)
        for (name, m), row, ok, t in zip(layers, values, finite, seconds, strict=True)
    ]
