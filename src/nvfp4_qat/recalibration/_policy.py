"""The execution of a policy other than the plain sweep, and the loss checks of any policy.

The criterion's scores come from :func:`~nvfp4_qat.policy.policy_scales` (PyTorch, any device); this
module turns them into a recalibration that fills the same :class:`~nvfp4_qat.recalibration.report.LayerStats`
as the sweep paths. A replicated model runs it on every rank (the same inputs give the same scales).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.policy import InputMoments, RecalibrationPolicy, adam_moments, policy_scales
from nvfp4_qat.recalibration._layers import (
    LayerClock,
    full_weight,
    restore_scales,
    scale_codes,
    scale_snapshot,
    weight_stats,
)
from nvfp4_qat.recalibration.report import LayerStats

__all__ = ["check_layers", "scored_scales"]

Layers = list[tuple[str, NVFP4Linear]]


def scored_scales(
    layers: Layers,
    policy: RecalibrationPolicy,
    all_or_nothing: bool,
    optimizer: torch.optim.Optimizer | None,
    input_moments: InputMoments | None,
) -> tuple[LayerStats, list[bool], list[float]]:
    """Every layer's new scales under ``policy``, written in place; ``(stats [L], done, seconds)``.

    All new scales are computed before the first is written, so an error leaves the model as it
    was; a layer with a non-finite weight is left alone (every layer, with ``all_or_nothing``).
    """
    device = layers[0][1].block_amax.device
    before = torch.stack([weight_stats(m).to(device) for _, m in layers])  # [L, 3]
    finite = torch.isfinite(before[:, 1]).tolist()  # max |w|: NaN/Inf exactly for a bad weight
    done = [ok and (all(finite) or not all_or_nothing) for ok in finite]
    new: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for (name, m), ok, stats in zip(layers, done, before, strict=True):
        if not ok:
            new.append(None)
            continue
        g_new = torch.maximum(m.global_amax, stats[1]) if policy.keep_global_amax else stats[1].clone()
        feature = input_moments.get(name) if policy.needs_input_moments else None
        moments = adam_moments(optimizer, m.weight) if policy.needs_optimizer else None
        scales = policy_scales(full_weight(m), m.block_amax, m.global_amax, g_new, policy, feature, moments)
        new.append((g_new, scales))
    clock, after, changed, g_old, g_after = LayerClock(device), [], [], [], []
    for (_, m), scales, stats in zip(layers, new, before, strict=True):
        g_old.append(m.global_amax.clone().to(device))
        if scales is None:
            after.append(stats[0])
            changed.append(torch.zeros((), device=device))
            g_after.append(g_old[-1])
        else:
            old_codes = scale_codes(m)
            m.global_amax.copy_(scales[0])
            m.block_amax.copy_(scales[1])
            after.append(weight_stats(m)[0].to(device))
            changed.append((scale_codes(m) != old_codes).sum().to(device))
            g_after.append(scales[0].to(device))
        clock.mark()
    stats = LayerStats(before[:, 0], torch.stack(after), torch.stack(changed), before[:, 2],
                       torch.stack(g_old), torch.stack(g_after))  # fmt: skip
    return stats, finite, clock.seconds()


def check_layers(
    layers: Layers,
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
