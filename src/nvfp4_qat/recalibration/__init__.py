"""Recalibration: one entry, :func:`recalibrate`, for every way the scales are refreshed.

* :mod:`.plan`: the arguments checked and the execution decided once (:class:`RecalibrationPlan`);
* :mod:`._execute`: the plain sweep over many layers, generic or fused GPU path;
* :mod:`._distributed`: the same split across the ranks of ``torch.distributed``;
* :mod:`._policy`: the policies that score candidates otherwise, and the loss checks;
* :mod:`.report`: the per-layer record every path fills (:class:`LayerStats`), the rows and the report.
"""

from nvfp4_qat.recalibration._distributed import layer_owners
from nvfp4_qat.recalibration._layers import ON_NONFINITE, weight_sse, weight_stats
from nvfp4_qat.recalibration.engine import recalibrate, recalibrate_distributed
from nvfp4_qat.recalibration.plan import EXECUTIONS, RecalibrationPlan, distributed_world_size, resolve_plan
from nvfp4_qat.recalibration.report import LayerRecalibration, LayerStats, RecalibrationReport

__all__ = [
    "EXECUTIONS",
    "ON_NONFINITE",
    "LayerRecalibration",
    "LayerStats",
    "RecalibrationPlan",
    "RecalibrationReport",
    "distributed_world_size",
    "layer_owners",
    "recalibrate",
    "recalibrate_distributed",
    "resolve_plan",
    "weight_sse",
    "weight_stats",
]
