"""Item 4 of issue 16: the calibration quantize_model has just done is not repeated at fit start."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nvfp4_qat import NVFP4Recalibration, quantize_model
from nvfp4_qat import sweep as sweep_module
from nvfp4_qat.quantize import calibration_is_current
from nvfp4_qat.recalibration import _execute


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(model, cb, steps=4):
    data = DataLoader(TensorDataset(torch.randn(32, 32), torch.randn(32, 16)), batch_size=4)
    kw = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    pl.Trainer(callbacks=[cb], max_steps=steps, enable_model_summary=False, **kw).fit(model, data)


def _count_sweeps(monkeypatch) -> list[int]:
    """Every reference sweep: the public one (quantize_model) and recalibration's generic path."""
    calls = []
    real = sweep_module.sweep_reference

    def counting(x, *a, **k):
        calls.append(x.numel())
        return real(x, *a, **k)

    monkeypatch.setattr(sweep_module, "sweep_reference", counting)
    monkeypatch.setattr(_execute, "sweep_reference", counting)
    return calls


def test_quantize_then_fit_calibrates_once(monkeypatch):
    torch.manual_seed(0)
    calls = _count_sweeps(monkeypatch)
    model = quantize_model(Tiny())
    assert calls == [32 * 32, 16 * 32]  # quantize_model swept each layer once
    assert calibration_is_current(model)
    cb = NVFP4Recalibration(every_n_train_steps=0)
    _fit(model, cb)
    assert calls == [32 * 32, 16 * 32]  # ... and the callback did not sweep again at fit start
    assert cb.history == [] and cb.state_dict()["calibrated_at_start"]


def test_fit_start_calibrates_when_weights_or_settings_changed(monkeypatch, caplog):
    torch.manual_seed(0)
    calls = _count_sweeps(monkeypatch)
    model = quantize_model(Tiny())
    with torch.no_grad():
        model.net[0].weight.mul_(1.5)  # the weights moved since the calibration
    assert not calibration_is_current(model)
    cb = NVFP4Recalibration(every_n_train_steps=0)
    _fit(model, cb)
    assert [h["reason"] for h in cb.history] == ["fit_start"] and len(calls) == 4
    # without a progress bar the two feedback lines go to Lightning's INFO log
    lines = [
        r.getMessage()
        for r in caplog.records
        if "NVFP4 recalibration" in r.getMessage() or "done in" in r.getMessage()
    ]
    assert lines[0] == "NVFP4 recalibration at fit start: 2 layers, 0.00M weights ..."
    assert lines[1].startswith("... done in ") and "of block scales moved" in lines[1]

    max_scaled = quantize_model(Tiny(), init_calibration="max")  # not the sweep's scales
    assert not calibration_is_current(max_scaled)
    cb = NVFP4Recalibration(every_n_train_steps=0)
    _fit(max_scaled, cb)
    assert [h["reason"] for h in cb.history] == ["fit_start"]


def test_optimizer_step_makes_the_calibration_stale():
    torch.manual_seed(0)
    model = quantize_model(Tiny())
    _fit(model, NVFP4Recalibration(every_n_train_steps=0, at_fit_start=False), steps=1)
    assert not calibration_is_current(model)
    assert not calibration_is_current(Tiny())  # no NVFP4 layer: nothing is current
