"""NVFP4Recalibration next to Lightning's own features, and the strategies it refuses.

One CPU run composes ModelCheckpoint, EarlyStopping, LearningRateMonitor (with a scheduler),
gradient clipping and bf16-mixed precision; another uses ``Trainer(fast_dev_run=True)``. The
LightningModule's ``forward`` keeps its signature, keyword arguments included. FSDP1 and DeepSpeed
are refused at setup with a message that names them and what is supported.
"""

import csv
import inspect
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nvfp4_qat import NVFP4Linear, NVFP4Recalibration, fake_quantize_nvfp4, nvfp4_scale_sweep
from nvfp4_qat.callback import check_strategy
from nvfp4_qat.quantize import nvfp4_layers

LR, CLIP = 0.05, 0.5  # unclipped, the first epoch's gradient norms are 0.6 to 0.8


class Regressor(pl.LightningModule):
    """A module whose forward takes keyword arguments; plain SGD so that clipping bounds each step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.output_dtypes: set[torch.dtype] = set()

    def forward(
        self, x: torch.Tensor, *, scale: float = 1.0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = self.net(x) * scale
        return y if mask is None else y * mask

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x, scale=1.0)
        self.output_dtypes.add(out.dtype)
        return nn.functional.mse_loss(out.float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        }


def loader(n: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=gen)
    return DataLoader(TensorDataset(x, torch.tanh(x @ torch.randn(32, 32, generator=gen))), batch_size=4)


class StepSizes(pl.Callback):
    """The norm of each optimizer step's parameter update (clipping bounds it by lr * clip)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        delta = [p.detach() - b for p, b in zip(pl_module.parameters(), self.before, strict=True)]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in delta]))))


def test_composes_with_checkpoint_early_stopping_lr_monitor_clipping_and_bf16(tmp_path):
    recal = NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1)
    # No epoch improves val_loss by 10: EarlyStopping ends the run after epoch 1 of 5.
    stop = EarlyStopping(monitor="val_loss", min_delta=10.0, patience=1)
    steps, model = StepSizes(), Regressor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=5, precision="bf16-mixed",
        gradient_clip_val=CLIP, callbacks=[recal, stop, LearningRateMonitor("epoch"), steps, ckpt],
        logger=CSVLogger(tmp_path, name="log", version=0), log_every_n_steps=1, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader(), loader(8))

    # 8 steps per epoch; stopped after epoch 1; recalibrated every 4 optimizer steps (setup calibrated)
    assert stop.stopped_epoch == 1 and trainer.global_step == 16
    assert [(h["reason"], h["step"]) for h in recal.history] == [("step", s) for s in (4, 8, 12, 16)]
    assert model.output_dtypes == {torch.bfloat16}  # autocast reached through NVFP4Linear
    # every step clipped: plain SGD moves the weights by exactly lr * CLIP (lr halves after epoch 0)
    bounds = [LR * CLIP] * 8 + [LR / 2 * CLIP] * 8
    assert all(math.isclose(n, b, rel_tol=1e-4) for n, b in zip(steps.norms, bounds, strict=True)), (
        steps.norms
    )

    # the checkpoints hold the scale buffers, consistent with their weights: each was written right
    # after the recalibration of the epoch's last step
    for epoch, step in ((0, 8), (1, 16)):
        state = torch.load(tmp_path / "ckpt" / f"epoch={epoch}-step={step}.ckpt", weights_only=False)
        sd = state["state_dict"]
        for name in ("net.0", "net.2"):
            w, g = sd[f"{name}.weight"], sd[f"{name}.global_amax"]
            assert torch.equal(g, w.abs().amax()), (epoch, name)
            assert torch.equal(sd[f"{name}.block_amax"].flatten(), nvfp4_scale_sweep(w, g)), (epoch, name)
        assert state["callbacks"]["NVFP4Recalibration"]["last_step"] == step
    assert torch.equal(sd["net.2.block_amax"], model.net[2].block_amax)  # the last one is the final state

    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")]
    assert lrs == [LR, LR / 2]  # StepLR halves it each epoch; logged at each epoch start
    # logged on Lightning's step index for the point after optimizer steps 4, 8, 12, 16 (as val_loss)
    assert [int(r["step"]) for r in rows if r.get("nvfp4/mse_after")] == [3, 7, 11, 15]


def test_fast_dev_run(tmp_path):
    recal = NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=1, at_fit_end=True)
    model = Regressor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", fast_dev_run=True, callbacks=[recal],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader(), loader(8))
    assert trainer.global_step == 1
    assert [(h["reason"], h["step"]) for h in recal.history] == [("step", 1)]
    layer = model.net[0]
    g = layer.weight.detach().abs().amax()
    assert torch.equal(layer.global_amax, g)
    assert torch.equal(layer.block_amax.flatten(), nvfp4_scale_sweep(layer.weight.detach(), g))


def test_forward_signature_and_kwargs_survive_quantization(tmp_path):
    model = Regressor()
    signature = inspect.signature(model.forward)
    x, mask = torch.randn(3, 32), (torch.arange(32) % 2).float()
    pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=2, callbacks=[NVFP4Recalibration(policy="mse", settle_fraction=0.0)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, loader())  # fmt: skip
    assert isinstance(model.net[0], NVFP4Linear) and isinstance(model.net[2], NVFP4Linear)
    assert inspect.signature(model.forward) == signature
    model.eval()
    with torch.no_grad():
        out = model(x=x, scale=2.0, mask=mask)
        layers = [m for _, m in nvfp4_layers(model)]
        h = x
        for i, m in enumerate(layers):
            h = nn.functional.linear(h, fake_quantize_nvfp4(m.weight, m.block_amax, m.global_amax), m.bias)
            h = torch.relu(h) if i == 0 else h
    assert torch.equal(out, h * 2.0 * mask)


# --- strategies the callback refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "named"),
    [
        (FSDPStrategy(), "the strategy FSDPStrategy: FSDP1"),
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), "the strategy DeepSpeedStrategy: DeepSpeed"),
    ],
    ids=["fsdp1", "deepspeed"],  # DeepSpeedStrategy() needs deepspeed installed: built without __init__
)
def test_unsupported_strategies_are_detected(strategy, named):
    with pytest.raises(ValueError, match=f"does not support {named}") as err:
        check_strategy(strategy)
    assert "Supported: a single device, DDP" in str(err.value) and "FSDP2 (ModelParallelStrategy" in str(
        err.value
    )


def test_supported_strategies_pass(tmp_path):
    # check_strategy refuses by raising; the supported ones return None ...
    assert [
        check_strategy(s) for s in (SingleDeviceStrategy("cpu"), DDPStrategy(), ModelParallelStrategy())
    ] == [
        None,
        None,
        None,
    ]
    # ... and a real fit under the single-device strategy quantizes and recalibrates (DDP and FSDP2
    # runs are in tests/test_distributed.py).
    model, recal = Regressor(), NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=1)
    pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, strategy=SingleDeviceStrategy("cpu"),
        max_steps=2, callbacks=[recal], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, loader())  # fmt: skip
    assert len(nvfp4_layers(model)) > 0
    # No fit-start entry: the callback's setup has just quantized and calibrated the model.
    assert [(h["reason"], h["step"]) for h in recal.history] == [("step", 1), ("step", 2)]


class CPUFSDP(FSDPStrategy):
    """FSDPStrategy, which Lightning builds only with a GPU; this subclass gets past that check."""


def test_fsdp1_strategy_is_refused_at_setup(tmp_path):
    model = Regressor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, strategy=CPUFSDP(), max_steps=1,
        callbacks=[NVFP4Recalibration(policy="mse", settle_fraction=0.0)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    try:
        with pytest.raises(
            ValueError, match=r"does not support the strategy CPUFSDP \(a FSDPStrategy\): FSDP1"
        ):
            trainer.fit(model, loader())
    finally:  # the strategy started a one-process group; later tests start their own
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not nvfp4_layers(model)  # refused before any layer was swapped
