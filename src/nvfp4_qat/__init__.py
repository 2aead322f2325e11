"""nvfp4_qat: quantization-aware fine-tuning in NVIDIA's NVFP4 format, with scales that follow the
weights (periodic MSE recalibration over all 126 FP8 E4M3 block-scale candidates)."""

from nvfp4_qat.format import fake_quantize_nvfp4, fp8_scale_candidates
from nvfp4_qat.sweep import nvfp4_scale_sweep

__version__ = "0.1.0"

__all__ = [
    "fake_quantize_nvfp4",
    "fp8_scale_candidates",
    "nvfp4_scale_sweep",
]
