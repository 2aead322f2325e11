"""The sweep kernels run with fixed tile configs (no autotuning), and each default is exact."""

from __future__ import annotations

import pytest
from triton.runtime.jit import JITFunction

from nvfp4_qat._sweep_reference import sweep_reference
from nvfp4_qat.kernels import _sweep_kernels as K
from nvfp4_qat.kernels.sweep import DEFAULT_CONFIGS, launch_sweep
from test_sweep_triton import adversarial_blocks, amax, assert_same_blocks, mixed_weight


def test_kernels_are_not_autotuned():
    # A first call compiles (or loads from Triton's disk cache) one kernel and runs no trials.
    for name in ("_sweep_pruned_kernel", "_sweep_exhaustive_kernel", "_sweep_worklist_kernel"):
        assert isinstance(getattr(K, name), JITFunction), name
    assert DEFAULT_CONFIGS == {
        "_sweep_exhaustive_kernel": K.EXHAUSTIVE_CONFIGS[0],
        "_sweep_pruned_kernel": K.PRUNED_CONFIGS[0],
    }


@pytest.mark.parametrize(("n_below", "n_extra"), [(3, 2), (0, 0)])
@pytest.mark.parametrize("method", ["pruned", "exhaustive"])
def test_interpreter_default_cuda_config_is_exact(monkeypatch, method, n_below, n_extra):
    # The CUDA default tile, pinned under the interpreter, on the adversarial blocks (all-equal,
    # zeros, single outliers, on-grid values, FP8-subnormal scales) and a mixed weight.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = DEFAULT_CONFIGS[f"_sweep_{method}_kernel"]
    for x in (adversarial_blocks(1), mixed_weight(200, 3), adversarial_blocks(2).bfloat16() * 1e-30):
        g = amax(x)
        out, _, _ = launch_sweep(x, g, method, config=cfg, n_below=n_below, n_extra=n_extra)
        assert_same_blocks(out, sweep_reference(x, g))
