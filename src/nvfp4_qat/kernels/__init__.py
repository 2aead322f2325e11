"""Triton kernels (imported only when the Triton backend is used; needs the ``triton`` package).

``sweep_triton`` is the fused NVFP4 scale sweep behind ``nvfp4_scale_sweep(backend="triton")``.
"""

from nvfp4_qat.kernels.sweep import sweep_triton

__all__ = ["sweep_triton"]
