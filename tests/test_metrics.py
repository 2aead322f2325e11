"""torchmetrics weight-quantization metrics: pure functions and Metric accumulation."""

import math

import torch

from nvfp4_qat import ScaleChangeFraction, WeightQuantMSE, WeightQuantSQNR, quantize_model, recalibrate
from nvfp4_qat.metrics import mse_from_sums, sqnr_db_from_sums
from nvfp4_qat.recalibration import weight_sse


def test_pure_functions():
    assert mse_from_sums(torch.tensor(6.0, dtype=torch.float64), torch.tensor(3)).item() == 2.0
    assert mse_from_sums(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0)).item() == 0.0  # not NaN
    assert math.isclose(
        sqnr_db_from_sums(torch.tensor(1000.0), torch.tensor(1.0)).item(), 30.0, rel_tol=1e-12
    )
    assert sqnr_db_from_sums(torch.tensor(5.0), torch.tensor(0.0)).item() == math.inf


def test_metric_class_attributes_and_states():
    for cls, higher in ((WeightQuantMSE, False), (WeightQuantSQNR, True), (ScaleChangeFraction, None)):
        assert cls.is_differentiable is False and cls.full_state_update is False
        assert cls.higher_is_better is higher
    m = WeightQuantMSE()
    assert m._reductions["sse"].__name__ in ("dim_zero_sum", "sum") and set(m._defaults) == {"sse", "numel"}


def test_metrics_accumulate_element_weighted():
    m = WeightQuantMSE()
    m.update(torch.tensor(4.0), 2)  # mse 2 over 2 elements
    m.update(8.0, 6)  # mse 1.33 over 6 elements
    assert m.compute().item() == 12.0 / 8
    m.reset()
    assert m.compute().item() == 0.0
    s = WeightQuantSQNR()
    s.update(energy=50.0, sse=0.5)
    s.update(energy=50.0, sse=0.5)
    assert math.isclose(s.compute().item(), 20.0, rel_tol=1e-12)
    c = ScaleChangeFraction()
    c.update(3, 10)
    c.update(torch.tensor(1), 30)
    assert c.compute().item() == 0.1


def test_mse_metric_from_a_model_equals_report_totals():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))
    quantize_model(model, init_calibration="max")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layers = [model[0], model[1]]
    metric = WeightQuantMSE()
    for layer in layers:
        metric.update(*weight_sse(layer))
    stale = metric.compute().item()
    report = recalibrate(model, backend="reference")
    assert math.isclose(stale, report.mse_before, rel_tol=1e-6)
    metric.reset()
    for layer in layers:
        metric.update(*weight_sse(layer))
    assert math.isclose(metric.compute().item(), report.mse_after, rel_tol=1e-6)
    assert report.mse_after < stale
