"""Triton kernels (need the ``triton`` package). Nothing here is imported with :mod:`nvfp4_qat`:
each module loads when its backend is first used.

* :mod:`.fake_quant`: the fused fake-quant (the forward of ``NVFP4Linear`` on CUDA, registered as
  ``torch.ops.nvfp4_qat.fake_quant_nvfp4``) and recalibration's statistics pass;
* :mod:`.sweep`: the launcher of the scale-sweep kernels (:mod:`._sweep_kernels`), behind
  ``nvfp4_scale_sweep(backend="triton")`` and recalibration;
* :mod:`._interpret`: interpreted copies of the kernels for CPU tensors under ``TRITON_INTERPRET=1``.
* :mod:`._launch`: the sweep kernels' launch path (Triton's binder, then the compiled kernel directly).
"""

__all__ = ["sweep_triton"]


def __getattr__(name: str):
    # ``nvfp4_qat.kernels.sweep_triton`` keeps working without importing Triton with the package.
    if name == "sweep_triton":
        from nvfp4_qat.kernels.sweep import sweep_triton

        return sweep_triton
    raise AttributeError(f"module 'nvfp4_qat.kernels' has no attribute {name!r}")
