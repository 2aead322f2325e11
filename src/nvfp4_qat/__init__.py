"""nvfp4_qat: quantization-aware fine-tuning in NVIDIA's NVFP4 format, with scales that follow the
weights (periodic MSE recalibration over all 126 FP8 E4M3 block-scale candidates).

The Lightning callback and the torchmetrics metrics load on first use (PEP 562 ``__getattr__``), so
``import nvfp4_qat`` and ``import nvfp4_qat.format`` need neither Lightning nor torchmetrics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nvfp4_qat._version import __version__ as __version__
from nvfp4_qat.config import QATConfig
from nvfp4_qat.export import export_nvfp4, load_nvfp4
from nvfp4_qat.format import fake_quantize_nvfp4, fp8_scale_candidates
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.quantize import quantize_model
from nvfp4_qat.recalibration import RecalibrationReport, recalibrate, recalibrate_distributed
from nvfp4_qat.sweep import nvfp4_scale_sweep, nvfp4_scale_sweep_ex

if TYPE_CHECKING:
    from nvfp4_qat.callback import NVFP4Recalibration, restore_quantization
    from nvfp4_qat.metrics import ScaleChangeFraction, WeightQuantMSE, WeightQuantSQNR


__all__ = [
    "NVFP4Linear",
    "NVFP4Recalibration",
    "QATConfig",
    "RecalibrationReport",
    "ScaleChangeFraction",
    "WeightQuantMSE",
    "WeightQuantSQNR",
    "export_nvfp4",
    "fake_quantize_nvfp4",
    "fp8_scale_candidates",
    "load_nvfp4",
    "nvfp4_scale_sweep",
    "nvfp4_scale_sweep_ex",
    "quantize_model",
    "recalibrate",
    "recalibrate_distributed",
    "restore_quantization",
]

#: Public names that load their module on first access: Lightning takes seconds to import.
_LAZY = {
    "NVFP4Recalibration": "nvfp4_qat.callback",
    "restore_quantization": "nvfp4_qat.callback",
    "ScaleChangeFraction": "nvfp4_qat.metrics",
    "WeightQuantMSE": "nvfp4_qat.metrics",
    "WeightQuantSQNR": "nvfp4_qat.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'nvfp4_qat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
