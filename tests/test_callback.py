"""NVFP4Recalibration in real Lightning runs: schedule, accumulation, resume, logging, loading."""

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nvfp4_qat import NVFP4Linear, NVFP4Recalibration, QATConfig, quantize_model, restore_quantization
from nvfp4_qat.callback import sanitize_metric_name
from nvfp4_qat.quantize import nvfp4_layers


class TinyRegressor(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def on_load_checkpoint(self, checkpoint):
        restore_quantization(self, checkpoint)


def loader(n: int = 64, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=gen)
    y = torch.tanh(x @ torch.randn(32, 32, generator=gen))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_train_steps": -1}, r"`every_n_train_steps` must be an int >= 0, got -1"),
        ({"every_n_epochs": 1.5}, r"`every_n_epochs` must be an int >= 0, got 1.5"),
        ({"start_step": True}, r"`start_step` must be an int >= 0, got True"),
        ({"start_step": 5, "stop_step": 5}, r"`stop_step` must be None or > start_step=5, got 5"),
        ({"backend": "cuda"}, r"`backend` must be one of \('auto', 'triton', 'reference'\), got 'cuda'"),
        ({"method": "greedy"}, r"`method` must be one of \('pruned', 'exhaustive'\), got 'greedy'"),
        ({"on_nonfinite": "warn"}, r"`on_nonfinite` must be one of \('raise', 'skip'\), got 'warn'"),
        ({"at_fit_start": "yes"}, r"`at_fit_start` must be a bool"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Recalibration(policy="mse", settle_fraction=0.0, **kwargs)


def test_quant_config_accepts_dict_and_rejects_other_types():
    cb = NVFP4Recalibration(
        policy="mse", settle_fraction=0.0, quant_config={"exclude": ["net.2"], "init_calibration": "max"}
    )
    assert cb.quant_config.exclude == ("net.2",) and cb.quant_config.init_calibration == "max"
    with pytest.raises(TypeError, match="`quant_config` must be a QATConfig, a dict or None, got int"):
        NVFP4Recalibration(policy="mse", settle_fraction=0.0, quant_config=3)


def test_default_schedule():
    cb = NVFP4Recalibration(
        policy="mse", settle_fraction=0.0, every_n_train_steps=10, start_step=10, stop_step=40
    )
    steps = [i for i in range(60) if cb.should_recalibrate(step_idx=i)]
    assert steps == [19, 29, 39]  # after optimizer steps 20, 30, 40; frozen from index 40 on
    cb = NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_epochs=2)
    assert [e for e in range(6) if cb.should_recalibrate(step_idx=100, epoch_idx=e)] == [1, 3, 5]
    assert not NVFP4Recalibration(policy="mse", settle_fraction=0.0).should_recalibrate(step_idx=0)


# --- timing in a real run ------------------------------------------------------------------------


class RecordingRecalibration(NVFP4Recalibration):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.asked = []

    def should_recalibrate(self, step_idx=None, epoch_idx=None):
        self.asked.append((step_idx, epoch_idx))
        return super().should_recalibrate(step_idx, epoch_idx)


def test_counts_optimizer_steps_not_micro_batches(tmp_path):
    """accumulate_grad_batches=4: 48 micro-batches, 12 optimizer steps, recalibration after
    steps 3, 6, 9, 12 and never between micro-batches of one window. (No fit-start entry: the
    callback's setup has just quantized and calibrated the model.)"""
    cb = RecordingRecalibration(every_n_train_steps=3, policy="mse", settle_fraction=0.0)
    model = TinyRegressor()
    trainer(tmp_path, [cb], max_steps=12, accumulate_grad_batches=4).fit(model, loader(n=192))
    assert [(h["reason"], h["step"]) for h in cb.history] == [
        ("step", 3),
        ("step", 6),
        ("step", 9),
        ("step", 12),
    ]
    step_calls = [s for s, e in cb.asked if e is None]
    assert step_calls == list(range(12))  # asked once per optimizer step, zero-based
    assert len(nvfp4_layers(model)) == 2


def test_window_and_epoch_schedule(tmp_path):
    # 16 steps per epoch, 3 epochs; epochs 2 and 3 end at steps 32 and 48; frozen from index 40
    cb = NVFP4Recalibration(
        policy="mse", settle_fraction=0.0, every_n_train_steps=5, every_n_epochs=1, start_step=8, stop_step=40
    )
    trainer(tmp_path, [cb], max_epochs=3).fit(TinyRegressor(), loader())
    assert [(h["reason"], h["step"]) for h in cb.history] == [
        ("step", 10),
        ("step", 15),
        ("epoch", 16),
        ("step", 20),
        ("step", 25),
        ("step", 30),
        ("epoch", 32),
        ("step", 35),
        ("step", 40),
    ]


def test_sanity_check_does_nothing_and_scales_follow_weights(tmp_path):
    cb = NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=8, at_fit_end=True)
    model = TinyRegressor(lr=0.2)
    trainer(tmp_path, [cb], max_epochs=2, num_sanity_val_steps=2).fit(model, loader(), loader(16))
    assert [h["reason"] for h in cb.history] == ["step", "step", "step", "step"]
    layer = model.net[0]
    assert isinstance(layer, NVFP4Linear)
    # the scales equal a fresh sweep of the final weights (the last recalibration is after the
    # final optimizer step, so nothing moved since)
    from nvfp4_qat import nvfp4_scale_sweep

    g = layer.weight.detach().abs().amax()
    assert torch.equal(layer.global_amax, g)
    assert torch.equal(layer.block_amax.flatten(), nvfp4_scale_sweep(layer.weight.detach(), g))
    for h in cb.history:
        assert h["mse_after"] <= h["mse_before"] and 0.0 <= h["changed_fraction"] <= 1.0
        assert h["sqnr_db"] > 10 and h["seconds"] > 0


# --- logging -------------------------------------------------------------------------------------


def test_logs_through_the_trainer_loggers(tmp_path):
    """nvfp4/* metrics land on the step index Lightning gives val_loss for the same point."""
    cb = NVFP4Recalibration(
        policy="mse", settle_fraction=0.0, every_n_train_steps=4, at_fit_end=True, log_per_layer=True
    )
    logger = CSVLogger(tmp_path, name="run")
    model = quantize_model(TinyRegressor(), init_calibration="max")  # so fit start calibrates
    kw = dict(max_steps=8, logger=logger, log_every_n_steps=1, val_check_interval=4)
    trainer(tmp_path, [cb], **kw).fit(model, loader(), loader(8))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    recal = [r for r in rows if r.get("nvfp4/mse_after")]
    val_steps = [int(r["step"]) for r in rows if r.get("val_loss")]
    assert [h["reason"] for h in cb.history] == ["fit_start", "step", "step"]  # fit end: nothing new
    assert val_steps == [3, 7]  # after optimizer steps 4 and 8
    assert [int(r["step"]) for r in recal] == [0, 3, 7]
    for r, h in zip(recal, cb.history, strict=True):
        assert math.isclose(float(r["nvfp4/mse_after"]), h["mse_after"], rel_tol=1e-6)
        assert float(r["nvfp4/seconds"]) > 0
        assert "nvfp4/rel_improvement" in r and "nvfp4/changed_fraction" in r
        assert float(r["nvfp4/layer/net_0/mse_after"]) > 0 and float(r["nvfp4/layer/net_2/mse_after"]) > 0


def test_sanitize_metric_name():
    assert sanitize_metric_name("model.layers.0.self_attn.q_proj") == "model_layers_0_self_attn_q_proj"
    assert sanitize_metric_name("") == "model"


# --- checkpoints and resume ----------------------------------------------------------------------


class Crash(pl.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path):
    """A run killed at step 17 and resumed from its end-of-epoch checkpoint (step 16, written after
    validation) ends with the same weights, scales and recalibration history as an uninterrupted run.
    (A checkpoint from the middle of an epoch would replay batches: Lightning does not fast-forward
    a plain DataLoader, so the data order, not the scales, would differ.)"""
    kw = dict(max_steps=24, accumulate_grad_batches=2)  # 16 micro-batches per epoch: 8 steps

    def callback():
        return NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=5, every_n_epochs=1)

    pl.seed_everything(0)
    full, full_cb = TinyRegressor(), callback()
    trainer(tmp_path / "full", [full_cb], **kw).fit(full, loader(n=64), loader(n=8))

    pl.seed_everything(0)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", [callback(), ckpt, Crash(17)], enable_checkpointing=True, **kw).fit(
            TinyRegressor(), loader(n=64), loader(n=8)
        )

    pl.seed_everything(1)  # a different init: everything must come from the checkpoint
    resumed, resumed_cb = TinyRegressor(), callback()
    path = tmp_path / "ckpt" / "epoch=1-step=16.ckpt"
    trainer(tmp_path / "b", [resumed_cb], **kw).fit(resumed, loader(n=64), loader(n=8), ckpt_path=path)

    assert [h["step"] for h in full_cb.history] == [5, 8, 10, 15, 16, 20, 24]

    def timeless(history):  # wall time is the one logged value that may differ
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(resumed_cb.history) == timeless(full_cb.history)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and "net.0.block_amax" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_validate_and_load_from_checkpoint_of_a_qat_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = TinyRegressor(lr=0.2)
    cb = NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=3)
    trainer(tmp_path, [cb, ckpt], max_steps=6, enable_checkpointing=True).fit(model, loader())
    last = tmp_path / "last.ckpt"

    # Trainer.validate(ckpt_path=...) with a fresh, unquantized model: setup swaps the layers first
    fresh = TinyRegressor()
    out = trainer(tmp_path, [NVFP4Recalibration(policy="mse", settle_fraction=0.0)]).validate(
        fresh, loader(16), ckpt_path=last
    )
    assert torch.equal(fresh.net[0].block_amax, model.net[0].block_amax)
    assert out[0]["val_loss"] > 0

    # LightningModule.load_from_checkpoint: no trainer, no callback
    loaded = TinyRegressor.load_from_checkpoint(last)
    assert isinstance(loaded.net[2], NVFP4Linear)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(3, 32)
    assert torch.equal(loaded.net(x), model.net(x))


def test_restore_quantization_is_a_no_op_without_metadata():
    m = TinyRegressor()
    assert restore_quantization(m, {}) is False
    assert not nvfp4_layers(m)


# --- non-finite weights --------------------------------------------------------------------------


class Poison(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def test_nonfinite_weights_raise_or_keep_scales(tmp_path):
    with pytest.raises(ValueError, match="net.0"):
        trainer(
            tmp_path,
            [Poison(), NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=2)],
            max_steps=4,
        ).fit(TinyRegressor(), loader())
    model = TinyRegressor()
    cb = NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=2, on_nonfinite="skip")
    with pytest.warns(
        UserWarning, match=r"skipped 1 layer\(s\) with non-finite weights, scales kept: \['net.0'\]"
    ):
        trainer(tmp_path, [Poison(), cb], max_steps=2).fit(model, loader())
    assert torch.isfinite(model.net[0].block_amax).all() and torch.isfinite(model.net[0].global_amax)
    assert [r.name for r in cb.last_report.layers if r.skipped] == ["net.0"]


def test_config_excludes_layers(tmp_path):
    model = TinyRegressor()
    cb = NVFP4Recalibration(policy="mse", settle_fraction=0.0, quant_config=QATConfig(exclude=("net.2",)))
    trainer(tmp_path, [cb], max_steps=1).fit(model, loader())
    assert isinstance(model.net[0], NVFP4Linear) and not isinstance(model.net[2], NVFP4Linear)


def test_restore_quantization_reads_layer_names_literally():
    # Issue 13: saved names were read as globs, so a layer named `h.h[0]` quantized `h.h0` instead.
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleDict({"h[0]": nn.Linear(32, 32), "h0": nn.Linear(32, 32)})

    checkpoint = {"nvfp4_qat": {"layers": ["h.h[0]"], "config": QATConfig().__dict__}}
    model = Odd()
    assert restore_quantization(model, checkpoint)
    assert [name for name, _ in nvfp4_layers(model)] == ["h.h[0]"]
