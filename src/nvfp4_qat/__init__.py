"""nvfp4_qat: quantization-aware fine-tuning in NVIDIA's NVFP4 format, with scales that follow the
weights (periodic MSE recalibration over all 126 FP8 E4M3 block-scale candidates)."""

from nvfp4_qat.callback import NVFP4Recalibration, restore_quantization
from nvfp4_qat.config import QATConfig
from nvfp4_qat.distributed import recalibrate_distributed
from nvfp4_qat.export import export_nvfp4, load_nvfp4
from nvfp4_qat.format import fake_quantize_nvfp4, fp8_scale_candidates
from nvfp4_qat.metrics import ScaleChangeFraction, WeightQuantMSE, WeightQuantSQNR
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.quantize import quantize_model
from nvfp4_qat.recalibrate import RecalibrationReport, recalibrate
from nvfp4_qat.sweep import nvfp4_scale_sweep

__version__ = "0.1.0"

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
    "quantize_model",
    "recalibrate",
    "recalibrate_distributed",
    "restore_quantization",
]
