"""Triton kernels (need the ``triton`` package). :mod:`nvfp4_qat.modules` imports the fake-quant
kernel when triton is installed, to register its ``torch.ops`` op; the sweep kernels load on first use.

``sweep_triton`` is the fused NVFP4 scale sweep behind ``nvfp4_scale_sweep(backend="triton")``.
"""

from nvfp4_qat.kernels.sweep import sweep_triton

__all__ = ["sweep_triton"]
