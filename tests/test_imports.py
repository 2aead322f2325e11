"""Imports cost what they use: the package, its format module and the command's start-up do not
load Lightning (seconds on a small CPU); the callback and the metrics load on first access."""

import json
import subprocess
import sys

import pytest

HEAVY = ("lightning", "torchmetrics", "hydra", "omegaconf", "torch.distributed.tensor")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_import_loads_no_framework():
    modules = "nvfp4_qat, nvfp4_qat.format, nvfp4_qat.sweep, nvfp4_qat.export, nvfp4_qat.quantize"
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
