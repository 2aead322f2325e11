"""Imports cost what they use: the package, its format module and the command's start-up load neither
Lightning (seconds on a small CPU) nor Triton; the callback and the metrics load on first access,
the kernels when their backend is first used."""

import json
import subprocess
import sys

import pytest

HEAVY = ("lightning", "torchmetrics", "hydra", "omegaconf", "torch.distributed.tensor", "triton")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_import_loads_no_framework():
    modules = "nvfp4_qat, nvfp4_qat.format, nvfp4_qat.sweep, nvfp4_qat.export, nvfp4_qat.quantize, nvfp4_qat.recalibration"
    assert _loaded_after(f"import {modules}") == []


def test_command_module_loads_hydra_but_not_lightning():
    assert _loaded_after("import nvfp4_qat.cli, nvfp4_qat.lm") == ["hydra", "omegaconf"]


def test_lazy_names_resolve_on_first_access():
    import nvfp4_qat
    import nvfp4_qat.lm
    from nvfp4_qat.callback import NVFP4Recalibration, restore_quantization
    from nvfp4_qat.lm.module import CausalLMModule
    from nvfp4_qat.metrics import WeightQuantMSE

    assert nvfp4_qat.NVFP4Recalibration is NVFP4Recalibration
    assert nvfp4_qat.restore_quantization is restore_quantization
    assert nvfp4_qat.WeightQuantMSE is WeightQuantMSE
    assert nvfp4_qat.lm.CausalLMModule is CausalLMModule
    assert set(nvfp4_qat.__all__) <= set(dir(nvfp4_qat))
    assert set(nvfp4_qat.lm.__all__) <= set(dir(nvfp4_qat.lm))
    namespace: dict = {}
    exec("from nvfp4_qat import *", namespace)
    assert set(nvfp4_qat.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'NVFP4Recalibrator'"):
        _ = nvfp4_qat.NVFP4Recalibrator


def test_triton_loads_when_a_kernel_is_first_used():
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, sys, nvfp4_qat\n"
        "from nvfp4_qat.modules import fake_quantize\n"
        "x = torch.randn(4, 16); g = x.abs().max(); b = x.abs().reshape(-1, 16).amax(-1)\n"
        "fake_quantize(x, b, g, 'reference'); assert 'triton' not in sys.modules\n"
        "fake_quantize(x, b, g, 'triton')\n"
    )
    assert "triton" in _loaded_after(code)
