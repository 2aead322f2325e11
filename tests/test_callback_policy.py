"""NVFP4Recalibration with recalibration policies: arguments, settle window, loss check, hooks."""

import pytest
import torch
from torch import nn

from nvfp4_qat import NVFP4Recalibration
from nvfp4_qat.policy import POLICIES, RecalibrationPolicy
from nvfp4_qat.quantize import nvfp4_layers
from test_callback import TinyRegressor, loader, trainer


class AdamRegressor(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "best"}, r"`policy`: policy must be one of \('mse', .*got 'best'"),
        ({"policy": 1}, r"`policy`: policy must be a preset name or a RecalibrationPolicy, got int"),
        ({"settle_fraction": 1.0}, r"`settle_fraction` must be in \[0, 1\), got 1.0"),
        ({"settle_fraction": "0.4"}, r"`settle_fraction` must be a number in \[0, 1\), got '0.4'"),
        ({"loss_check_batches": -1}, r"`loss_check_batches` must be an int >= 0, got -1"),
        ({"policy": "loss_check", "loss_check_batches": 0}, r"`loss_check_batches` must be >= 1"),
    ],
)
def test_policy_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Recalibration(**kwargs)


def test_policy_object_is_accepted():
    custom = RecalibrationPolicy(min_gain=0.3, keep_global_amax=True)
    assert NVFP4Recalibration(policy=custom).policy is custom
    assert NVFP4Recalibration(policy="selective").policy is POLICIES["selective"]


def test_settle_window_freezes_the_last_fraction(tmp_path):
    recal = NVFP4Recalibration(every_n_train_steps=2, settle_fraction=0.5, policy="mse")
    trainer(tmp_path, [recal], max_steps=20).fit(TinyRegressor(), loader(n=200))
    steps = [h["step"] for h in recal.history if h["reason"] == "step"]
    assert steps == [2, 4, 6, 8, 10]  # step indices 1, 3, ..., 9 < 20 * (1 - 0.5)


def test_loss_check_uses_validation_batches_and_records_the_decision(tmp_path):
    recal = NVFP4Recalibration(
        every_n_train_steps=4, policy="loss_check", loss_check_batches=2, settle_fraction=0
    )
    model = TinyRegressor()
    trainer(tmp_path, [recal], max_steps=12, limit_val_batches=1).fit(model, loader(n=200), loader(n=16))
    rows = [h for h in recal.history if h["reason"] == "step"]
    assert [h["step"] for h in rows] == [4, 8, 12]
    for h in rows:
        assert h["rolled_back"] == float(not h["loss_after"] <= h["loss_before"])
        assert h["loss_before"] > 0
    # The held-out loss is the mean training_step loss of the first two validation batches.
    batches = list(loader(n=16))[:2]
    model.eval()
    with torch.no_grad():
        expected = sum(float(model.training_step(b, 0)) for b in batches) / 2
    final = rows[-1]["loss_before"] if rows[-1]["rolled_back"] else rows[-1]["loss_after"]
    assert final == pytest.approx(expected, rel=1e-6)
    assert "log" not in model.__dict__  # logging restored: no instance attribute left


def test_loss_check_without_validation_data_uses_training_batches_and_warns(tmp_path):
    recal = NVFP4Recalibration(every_n_train_steps=4, policy="loss_check", settle_fraction=0)
    with pytest.warns(UserWarning, match=r"no validation data and evaluates the first 2 training batches"):
        trainer(tmp_path, [recal], max_steps=4).fit(TinyRegressor(), loader())
    rows = [h for h in recal.history if h["reason"] == "step"]
    assert [h["step"] for h in rows] == [4] and rows[0]["loss_before"] > 0


def test_defaults_are_the_benchmarks_least_harmful_choice():
    recal = NVFP4Recalibration()
    assert recal.every_n_train_steps == 0 and recal.every_n_epochs == 0  # frozen unless asked
    assert recal.policy is POLICIES["loss_check_layer"] and recal.settle_fraction == 0.4


def test_gradient_policy_reads_the_adam_state(tmp_path):
    recal = NVFP4Recalibration(every_n_train_steps=3, policy="gradient", settle_fraction=0)
    trainer(tmp_path, [recal], max_steps=9).fit(AdamRegressor(), loader(n=200))
    assert [h["step"] for h in recal.history if h["reason"] == "step"] == [3, 6, 9]


def test_gradient_policy_refuses_an_optimizer_without_adam_state(tmp_path):
    recal = NVFP4Recalibration(every_n_train_steps=2, policy="gradient")
    with pytest.raises(ValueError, match=r"needs Adam/AdamW state .* SGD has none"):
        trainer(tmp_path, [recal], max_steps=4).fit(TinyRegressor(), loader())


def test_activation_hooks_live_only_during_training(tmp_path):
    recal = NVFP4Recalibration(every_n_train_steps=2, policy="activation", settle_fraction=0)
    model = TinyRegressor()
    trainer(tmp_path, [recal], max_steps=4).fit(model, loader())
    assert [h["step"] for h in recal.history if h["reason"] == "step"] == [2, 4]
    assert all(not m._forward_hooks for _, m in nvfp4_layers(model))
    assert recal._moments is None


def test_policy_scales_are_never_nan_after_training(tmp_path):
    for name in ("selective", "activation"):
        recal = NVFP4Recalibration(every_n_train_steps=1, policy=name)
        model = TinyRegressor()
        trainer(tmp_path, [recal], max_steps=5).fit(model, loader())
        for _, m in nvfp4_layers(model):
            assert torch.isfinite(m.block_amax).all() and torch.isfinite(m.global_amax), name
            assert isinstance(m, nn.Linear)
