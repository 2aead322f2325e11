"""Weight-quantization metrics as torchmetrics ``Metric`` objects, with the math in pure functions.

The states are plain sums registered with ``dist_reduce_fx="sum"``, so under DDP ``compute()``
reduces them across ranks like any torchmetrics metric (every rank must call it; Lightning's
``self.log`` and the recalibration callback make sure every rank does).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

__all__ = [
    "mse_from_sums",
    "sqnr_db_from_sums",
    "WeightQuantMSE",
    "WeightQuantSQNR",
    "ScaleChangeFraction",
]


def mse_from_sums(sse: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    """``sse / numel``; 0 when nothing was counted (never NaN)."""
    return torch.where(numel > 0, sse / numel.clamp(min=1), torch.zeros_like(sse))


def sqnr_db_from_sums(energy: torch.Tensor, sse: torch.Tensor) -> torch.Tensor:
    """Signal-to-quantization-noise ratio ``10 log10(energy / sse)`` in dB (``inf`` if sse == 0)."""
    if float(sse) == 0.0:
        return torch.tensor(math.inf, dtype=torch.float64, device=sse.device)
    return 10.0 * torch.log10(energy / sse)


class WeightQuantMSE(Metric):
    """Mean squared NVFP4 weight-quantization error over every element seen.

    ``update(sse, numel)`` adds one tensor's summed squared error (from
    :func:`nvfp4_qat.recalibration.weight_sse`, or a :class:`~nvfp4_qat.RecalibrationReport` row, so
    that nothing is quantized twice);
    ``compute()`` is the element-weighted mean over all tensors: a model's global weight MSE.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sse", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("numel", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, sse: float | torch.Tensor, numel: int | torch.Tensor) -> None:
        self.sse += torch.as_tensor(sse, dtype=torch.float64).to(self.sse.device)
        self.numel += int(numel)

    def compute(self) -> torch.Tensor:
        return mse_from_sums(self.sse, self.numel)


class WeightQuantSQNR(Metric):
    """Signal-to-quantization-noise ratio of the NVFP4 weights, in dB, over every element seen.

    ``update(energy, sse)`` adds one tensor's ``sum(w^2)`` and summed squared error.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sse", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("energy", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, energy: float | torch.Tensor, sse: float | torch.Tensor) -> None:
        self.energy += torch.as_tensor(energy, dtype=torch.float64).to(self.energy.device)
        self.sse += torch.as_tensor(sse, dtype=torch.float64).to(self.sse.device)

    def compute(self) -> torch.Tensor:
        return sqnr_db_from_sums(self.energy, self.sse)


class ScaleChangeFraction(Metric):
    """Fraction of blocks whose effective NVFP4 scale changed at a recalibration."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("changed", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, changed: int | torch.Tensor, total: int | torch.Tensor) -> None:
        self.changed += int(changed)
        self.total += int(total)

    def compute(self) -> torch.Tensor:
        return mse_from_sums(self.changed.to(torch.float64), self.total)
