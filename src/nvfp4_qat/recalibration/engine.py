"""``recalibrate``: refresh the static NVFP4 scales of every ``NVFP4Linear`` from its current weight.

One entry for every way it runs. :func:`~nvfp4_qat.recalibration.plan.resolve_plan` checks the
arguments and decides, once, the backend and the execution; then:

* the plain ``"mse"`` policy sweeps (:mod:`~nvfp4_qat.recalibration._execute`: the fused GPU path
  or the generic one), in this process or split across the ranks
  (:mod:`~nvfp4_qat.recalibration._distributed`);
* any other policy scores candidates with its criterion (:mod:`~nvfp4_qat.recalibration._policy`);
* a policy's loss check (whole model, or greedy per layer) wraps either.

Every path fills the same :class:`~nvfp4_qat.recalibration.report.LayerStats`, from which the rows
are built by name. Scales are written with ``copy_`` (or by a kernel into the same storage), so
every reference (optimizer, DDP bucket, FSDP, a compiled graph) keeps seeing the same tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from nvfp4_qat._compile_clock import compile_clock
from nvfp4_qat.policy import InputMoments, RecalibrationPolicy
from nvfp4_qat.recalibration import _policy
from nvfp4_qat.recalibration._execute import SweepTask, install_kernel_states, stale_stats, sweep
from nvfp4_qat.recalibration._layers import (
    HostCopy,
    apply_nonfinite_policy,
    full_weight,
    restore_scales,
    scale_snapshot,
)
from nvfp4_qat.recalibration.plan import RecalibrationPlan, check_policy_inputs, resolve_plan
from nvfp4_qat.recalibration.report import LayerStats, RecalibrationReport, build_rows

__all__ = ["recalibrate", "recalibrate_distributed"]


def recalibrate(
    model: nn.Module,
    backend: str = "auto",
    method: str = "pruned",
    on_nonfinite: str = "raise",
    policy: str | RecalibrationPolicy = "mse",
    optimizer: torch.optim.Optimizer | None = None,
    input_moments: InputMoments | None = None,
    evaluate: Callable[[], float] | None = None,
    distributed: bool | None = None,
) -> RecalibrationReport:
    """Recompute the scales of every ``NVFP4Linear`` in ``model`` from its current weight.

    Runs under ``torch.no_grad()``; writes ``global_amax`` and ``block_amax`` in place (same
    storage); never touches parameters, gradients, ``requires_grad`` or an optimizer.

    Under ``torch.distributed`` with several ranks (and ``distributed`` not ``False``) this is a
    collective: every rank must call it at the same point on the same model structure. The sweep
    is split across the ranks (replicated DDP layers: one owner each, whose scales are broadcast;
    FSDP2 row shards: each rank its rows) and every rank ends with the same scales and the same
    report. Every rank checks every replica it holds for NaN/Inf, and an all-reduced checksum of
    the replicas' bits catches ranks whose weights diverged.

    Args:
        model: a model prepared by :func:`~nvfp4_qat.quantize_model` (or holding ``NVFP4Linear``).
        backend: sweep backend, ``"auto"``, ``"triton"`` or ``"reference"`` (plain ``"mse"`` policy).
        method: sweep method, ``"pruned"`` or ``"exhaustive"`` (same result).
        on_nonfinite: a layer with NaN/Inf weights: ``"raise"`` a ``ValueError`` naming it, before
            any scale is written (on every rank); or ``"skip"`` it: its scales are kept, its row is
            marked skipped, and one warning (rank 0) names the skipped layers.
        policy: a preset of :data:`~nvfp4_qat.policy.POLICIES` or a
            :class:`~nvfp4_qat.policy.RecalibrationPolicy`: how candidates are scored and which
            changes are kept. ``"mse"`` (the exact weight-MSE sweep) is the plain sweep. Another
            policy runs on every rank for every layer (replicas compute the same scales); its input
            statistics are summed over the ranks first, and ``evaluate`` should return the mean
            over the ranks (the callback's does).
        optimizer: the training optimizer (Adam/AdamW), for the ``gradient`` criterion (refused
            with FSDP2-sharded weights: the optimizer state is sharded too).
        input_moments: the hooks' input statistics, for the ``activation`` criterion.
        evaluate: returns the held-out loss of the model as it is (in eval mode, no gradient),
            for policies with a ``loss_check``; called before and after the new scales (and,
            with ``loss_check="layer"``, once per layer whose scales changed).
        distributed: ``None`` (default) or ``True``: split the work across the ranks when a
            process group of several ranks is initialized; ``False``: all of it in this process
            (FSDP2 weights are still gathered, a collective).

    Returns:
        A :class:`RecalibrationReport` (``print`` it for a table; ``execution``, ``backend`` and
        ``fake_quant_backend`` say how it ran). A row's ``seconds`` is the GPU time of that
        layer's work (CUDA events: the layers are queued without a host sync between them; on the
        fused path the sweeps of consecutive layers run on two streams, so a layer's interval may
        overlap its neighbour's) or, on the CPU, its wall time.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``policy`` is neither a name nor a policy.
        ValueError: bad ``backend``/``method``/``on_nonfinite``/``policy``, a model without
            ``NVFP4Linear`` layers, non-finite weights with ``on_nonfinite="raise"``, or a policy
            whose input is missing (``optimizer``, ``input_moments``, ``evaluate``). Nothing was
            written then.
        RuntimeError: replicated weights differ between ranks (every rank; nothing written).
    """
    plan = resolve_plan(model, backend, method, on_nonfinite, policy, distributed)
    check_policy_inputs(plan, optimizer, input_moments, evaluate)
    layers, chosen = plan.layers, plan.policy
    start = time.perf_counter()
    with torch.no_grad(), compile_clock() as compiling:
        if plan.world > 1 and chosen.needs_input_moments:
            input_moments.all_reduce()  # every rank scores with the same statistics
        snapshot = scale_snapshot(layers) if chosen.checks_loss else None
        loss_before = float(evaluate()) if chosen.checks_loss else float("nan")
        values, done, seconds = _execute(plan, optimizer, input_moments)
        rows = build_rows(layers, values.tolist(), done, seconds)
        report = RecalibrationReport(
            layers=rows,
            loss_before=loss_before,
            execution=plan.label,
            backend=plan.backend,
            fake_quant_backend=plan.fake_quant_backend,
        )
        if chosen.loss_check == "model":
            report.loss_after = float(evaluate())
            if not report.loss_after <= loss_before:  # NaN rolls back too
                restore_scales(layers, snapshot)
                report.rolled_back_layers = tuple(name for name, _ in layers)
        elif chosen.loss_check == "layer":
            report.loss_after, report.rolled_back_layers = _policy.check_layers(
                layers, snapshot, evaluate, loss_before
            )
        report.rolled_back = len(report.rolled_back_layers) == len(layers)
        if report.rolled_back_layers:  # the rows describe the scales the layers hold
            kept = set(report.rolled_back_layers)
            report.layers = [r.unchanged() if r.name in kept else r for r in report.layers]
    report.seconds = time.perf_counter() - start
    report.compile_seconds = compiling.seconds
    return report


def recalibrate_distributed(model: nn.Module, *args, **kwargs) -> RecalibrationReport:
    """:func:`recalibrate` split across the ranks (``distributed=True``; its default does the same).

    Kept as a name of its own for code that says what it expects; same arguments and result.
    """
    kwargs.setdefault("distributed", True)
    return recalibrate(model, *args, **kwargs)


def _execute(
    plan: RecalibrationPlan, optimizer: torch.optim.Optimizer | None, input_moments: InputMoments | None
) -> tuple[HostCopy, list[bool], list[float]]:
    """Run the plan: ``(every layer's LayerStats values on their way to the host ([L, 6]), done per
    layer, seconds per layer)``, the scales written."""
    layers, raise_ = plan.layers, plan.on_nonfinite == "raise"
    rank0 = plan.world == 1 or torch.distributed.get_rank() == 0
    if plan.execution == "policy":
        stats, finite, seconds = _policy.scored_scales(layers, plan.policy, raise_, optimizer, input_moments)
        apply_nonfinite_policy([n for (n, _), ok in zip(layers, finite, strict=True) if not ok],
                               plan.on_nonfinite, warn=rank0)  # fmt: skip
        return _values(stats), finite, seconds
    if plan.world > 1:
        from nvfp4_qat.recalibration._distributed import sweep_distributed

        stats, done, seconds = sweep_distributed(plan)
        return _values(stats), done, seconds
    # One process: stale statistics, then the sweep with a global amax that is NaN where the
    # weight is not finite (or everywhere, with "raise" and one bad weight), so that nothing
    # waits for the check; the host learns the outcome once everything is queued, and prepares
    # the layers' kernel states while the GPU still sweeps.
    fused = plan.execution == "fused"
    # [L, 3]: sse, max |w|, sum w^2; the tasks made as the stats launches go out
    tasks, before = stale_stats((SweepTask(m, full_weight(m)) for _, m in layers), fused)
    g_new = before[:, 1]  # max |w|: exact, whatever the order of the reduction
    finite = torch.isfinite(g_new)
    live = finite & finite.all() if raise_ else finite
    flags = HostCopy(torch.stack([live, finite]))  # read once the sweeps are queued
    out = sweep(tasks, torch.where(live, g_new, torch.nan), plan.method, plan.backend, fused)
    # After the sweeps are queued (they write no global_amax): before, its host time delayed the
    # first sweep kernel, which the GPU waited for.
    amaxes = [m.quant_tensors()[2] for _, m in layers]
    g_old = torch.stack([a.to(g_new.device) for a in amaxes])
    g_write = torch.where(live, g_new, g_old)
    if fused:
        torch._foreach_copy_(amaxes, list(g_write.unbind()))
    else:
        for a, g in zip(amaxes, g_write.unbind(), strict=True):
            a.copy_(g)
    live_host, finite_host = flags.tolist()  # waits for the stats pass only: the sweeps still run
    apply_nonfinite_policy([n for (n, _), ok in zip(layers, finite_host, strict=True) if not ok],
                           plan.on_nonfinite)  # fmt: skip
    if fused:
        codes = out.task_codes(tasks)
        install_kernel_states([(t.layer, c) for t, c, ok in zip(tasks, codes, live_host, strict=True) if ok])
    # The values' copy is queued behind the last sweep before the clock waits for it: once the GPU
    # is done, the host reads them without another round trip.
    values = _values(LayerStats(before[:, 0], out.sse_after, out.n_changed, before[:, 2], g_old, g_new))
    return values, live_host, out.seconds


def _values(stats: LayerStats) -> HostCopy:
    # [L, 6]: each layer's fields, in one copy to the host.
    return HostCopy(stats.to_tensor().T.contiguous())
