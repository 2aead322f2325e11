"""The job behind ``nvfp4-qat``: a full-precision stage, NVFP4 QAT, and optionally the comparison.

One composed config drives it (see ``conf/nvfp4_qat.yaml``):

1. ``fp`` stage (``stages.fp.steps > 0``): plain training, no quantization.
2. with ``compare=true``, the protocol of ``benchmarks/qat_quality.py`` (ModelOpt's documented
   QAT recipe): ``fp_finetune`` fine-tunes the ``fp`` weights ``stages.qat`` steps in full
   precision (lr ``stages.qat.lr``); from *its* weights come post-training quantization with max
   and MSE-swept scales (no training) and the QAT variants ``qat_frozen`` (calibrated once),
   ``qat_max_step`` (max scales recomputed after every step: torchao's and ModelOpt's dynamic
   choice), ``qat_mse`` (the plain MSE re-sweep periodically, to the end) and ``qat_guarded``
   (policy ``loss_check_layer`` periodically, none in the last 40 %), each ``stages.qat`` steps.
3. ``qat`` stage: QAT fine-tuning with the configured recalibration callback (from the
   fine-tuned weights when comparing, so that every QAT row starts from the same point).

Every stage starts from the same seed, so the variants see the same batches in the same order:
the QAT ones differ only in how the scales are set. A QAT stage is validated right after the
model is quantized (its step 0) and every stage once more when it ends (a separate
``Trainer.validate``); those end-of-stage numbers fill the comparison table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from nvfp4_qat.lm.checks import UsageError
from nvfp4_qat.lm.console import progress_callbacks
from nvfp4_qat.lm.module import CausalLMModule, TokenThroughput, quantized_weight_mse

__all__ = ["RunResult", "StageResult", "evaluate", "run_job"]

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What one ``Trainer.fit`` stage measured.

    Attributes:
        name: ``"fp"``, ``"fp_finetune"``, ``"qat_frozen"``, ``"qat_max_step"``, ``"qat_mse"``,
            ``"qat_guarded"`` or ``"qat"``.
        steps: optimizer steps taken (``trainer.global_step`` at the end).
        seconds: wall time of ``Trainer.fit``.
        val_loss: mean validation cross-entropy after the stage (nats per token).
        history: the module's validation points ``{"step", "val_loss", "weight_mse"}``.
        recalibrations: the callback's ``history`` (empty for the full-precision stage).
        tokens_per_second: training throughput, validation excluded.
        device: the device it trained on (``cuda:0``, ``cpu``), with the world size if > 1.
    """

    name: str
    steps: int
    seconds: float
    val_loss: float | None
    history: list[dict] = field(default_factory=list)
    recalibrations: list[dict] = field(default_factory=list)
    tokens_per_second: float | None = None
    device: str = ""


@dataclass
class RunResult:
    """Everything the summary and the plot need.

    Attributes:
        stages: in the order they ran.
        comparison: ``(variant, val_loss)`` rows when ``compare`` was on, else empty.
        model: one line naming the network, its size and what was quantized.
        data: one line describing the text (from :meth:`TextDataModule.describe`).
    """

    stages: list[StageResult] = field(default_factory=list)
    comparison: list[tuple[str, float | None]] = field(default_factory=list)
    model: str = ""
    data: str = ""

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)


def _trainer(cfg: DictConfig, **overrides) -> pl.Trainer:
    return instantiate(cfg.trainer, **overrides)


def evaluate(cfg: DictConfig, module: CausalLMModule, datamodule: pl.LightningDataModule) -> float | None:
    """Mean validation loss of ``module`` as it is now (a quiet ``Trainer.validate``)."""
    trainer = _trainer(
        cfg,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return module.last_val_loss


def _logger(cfg: DictConfig, stage: str):
    if cfg.get("logger") is None:
        return False
    # Loggers that know a version (CSV, TensorBoard) get one sub-directory per stage.
    return instantiate(cfg.logger, **({"version": stage} if "version" in cfg.logger else {}))


def run_stage(
    name: str,
    cfg: DictConfig,
    module: CausalLMModule,
    datamodule: pl.LightningDataModule,
    callback: pl.Callback | None,
    extra_callbacks: tuple[pl.Callback, ...] = (),
) -> StageResult:
    """Fit ``module`` for one stage (``stages.fp`` or ``stages.qat`` settings), then evaluate it.

    A QAT stage (one with a ``callback``) first quantizes the model with ``cfg.quant`` (what the
    callback would do in its ``setup``) and evaluates it, so its history starts at step 0 with
    the loss right after quantization.
    """
    from nvfp4_qat import quantize_model
    from nvfp4_qat.quantize import nvfp4_layers

    settings = cfg.stages.fp if name == "fp" else cfg.stages.qat  # fp_finetune: as long as QAT
    start_point = []
    if callback is not None:
        if not nvfp4_layers(module):
            quantize_model(_where_training_runs(cfg, module), instantiate(cfg.quant))
        start_point = [
            {
                "step": 0,
                "val_loss": evaluate(cfg, module, datamodule),
                "weight_mse": quantized_weight_mse(module),
            }
        ]
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module.lr = float(settings.lr)
    module.history = []
    throughput = TokenThroughput()
    callbacks = [throughput] + ([callback] if callback is not None else []) + list(extra_callbacks)
    callbacks += progress_callbacks(bool(cfg.trainer.get("enable_progress_bar", True)), name)
    logger = _logger(cfg, name)
    where = {}
    run_dir = cfg.get("paths", {}).get("output_dir")
    if logger is False and "default_root_dir" not in cfg.trainer and run_dir is not None:
        # No logger: Lightning would checkpoint into ./checkpoints of the launch directory, every
        # stage into the same one; use the run dir, one folder per stage as with the CSV logger.
        where = {"default_root_dir": f"{run_dir}/logs/{name}"}
    trainer = _trainer(cfg, max_steps=int(settings.steps), callbacks=callbacks, logger=logger, **where)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    val_loss = evaluate(cfg, module, datamodule)
    history = start_point + module.history
    if not history or history[-1]["step"] != trainer.global_step:
        history.append(
            {"step": trainer.global_step, "val_loss": val_loss, "weight_mse": quantized_weight_mse(module)}
        )
    return StageResult(
        name=name,
        steps=trainer.global_step,
        seconds=seconds,
        val_loss=val_loss,
        history=history,
        recalibrations=list(getattr(callback, "history", [])),
        tokens_per_second=throughput.tokens_per_second,
        device=str(trainer.strategy.root_device)
        + (f" x {trainer.world_size}" if trainer.world_size > 1 else ""),
    )


def _where_training_runs(cfg: DictConfig, module: nn.Module) -> nn.Module:
    """Move ``module`` to the GPU when the trainer trains on one, so that its conversion and first
    calibration run there (``calibrator=triton`` refuses CPU tensors, and the reference sweep of a
    large model on the CPU takes minutes)."""
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available():
        module.cuda()
    return module


class MaxScalesEveryStep(pl.Callback):
    """The dynamic baseline: every layer's scales set to its max scales after each optimizer step
    (what torchao and ModelOpt's default NVFP4 QAT compute in every forward, for the weights)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._set(pl_module)

    @staticmethod
    def _set(pl_module: pl.LightningModule) -> None:
        from nvfp4_qat.quantize import nvfp4_layers

        for _, m in nvfp4_layers(pl_module):
            m.init_scales("max")


def _fresh_copy(cfg: DictConfig, state: dict[str, torch.Tensor]) -> CausalLMModule:
    # A new module with the given weights (deepcopy would drag the old trainer along).
    module = instantiate(cfg.model)
    module.load_state_dict(state)
    return module


def _describe_model(module: nn.Module) -> str:
    from nvfp4_qat.modules import NVFP4Linear

    params = sum(p.numel() for p in module.parameters())
    quantized = [n for n, m in module.named_modules() if isinstance(m, NVFP4Linear)]
    kept = [n for n, m in module.named_modules() if type(m) is nn.Linear]
    net = type(getattr(module, "net", module)).__name__
    line = f"{net}, {params / 1e6:.2f}M parameters"
    if quantized or kept:
        line += f"; {len(quantized)} NVFP4 linear layers"
        if kept:
            line += f", kept in high precision: {', '.join(kept[:4])}" + (" ..." if len(kept) > 4 else "")
    return line


def _frozen_overrides() -> dict:
    """What ``callback=frozen`` changes (conf/callback/frozen.yaml, the one definition of frozen)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    node = OmegaConf.load(files("nvfp4_qat.conf").joinpath("callback", "frozen.yaml"))
    return {k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"}


def run_job(cfg: DictConfig) -> RunResult:
    """Run the stages the config asks for and collect what the summary reports.

    Raises:
        UsageError: the data has token ids the network cannot embed.
    """
    from nvfp4_qat import quantize_model

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = instantiate(cfg.model)  # first: a wrong model directory is the likelier mistake
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if datamodule.vocab_size > module.vocab_size:
        raise UsageError(
            f"the data's tokenizer yields {datamodule.vocab_size} ids but the network embeds only "
            f"{module.vocab_size}; match them (byte-level text needs a vocabulary of at least 256, "
            f"a Hugging Face model needs data.tokenizer=hf with its own tokenizer)."
        )
    result = RunResult(data=datamodule.describe())
    if cfg.stages.fp.steps > 0:
        from nvfp4_qat.lm.multirun import cached_fp_stage

        stage, reused = cached_fp_stage(cfg, module, lambda: run_stage("fp", cfg, module, datamodule, None))
        if reused:
            log.info("stage fp: the same full-precision stage ran in an earlier job of this multirun; reused")
        result.stages.append(stage)
    if cfg.compare:
        finetune = run_stage("fp_finetune", cfg, module, datamodule, callback=None)
        result.stages.append(finetune)
        result.comparison.append(("full precision (fine-tuned)", finetune.val_loss))
        tuned_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for label, init in (("PTQ, max scales", "max"), ("PTQ, MSE-swept scales", "mse")):
            ptq = _where_training_runs(cfg, _fresh_copy(cfg, tuned_state))
            quantize_model(ptq, instantiate(cfg.quant, init_calibration=init))
            result.comparison.append((label, evaluate(cfg, ptq, datamodule)))
        every = int(cfg.callback.every_n_train_steps) or max(1, int(cfg.stages.qat.steps) // 8)
        plain = {"every_n_epochs": 0, "at_fit_start": True, "at_fit_end": False, "export_path": None}
        variants = [  # (stage, label, callback overrides, extra callbacks)
            ("qat_frozen", "QAT, frozen scales", _frozen_overrides(), ()),
            (
                "qat_max_step",
                "QAT, max scales every step",
                {"every_n_train_steps": 0},
                (MaxScalesEveryStep(),),
            ),
            (
                "qat_mse",
                f"QAT, plain MSE re-sweep every {every} steps",
                {"every_n_train_steps": every, "policy": "mse", "settle_fraction": 0.0},
                (),
            ),
            (
                "qat_guarded",
                f"QAT, loss_check_layer every {every} steps, settle 0.4",
                {"every_n_train_steps": every, "policy": "loss_check_layer", "settle_fraction": 0.4},
                (),
            ),
        ]
        for stage, label, overrides, extra in variants:
            callback = instantiate(cfg.callback, **plain, **overrides)
            run = run_stage(stage, cfg, _fresh_copy(cfg, tuned_state), datamodule, callback, extra)
            result.stages.append(run)
            result.comparison.append((label, run.val_loss))
    qat = run_stage("qat", cfg, module, datamodule, instantiate(cfg.callback))
    result.stages.append(qat)
    if cfg.compare:
        result.comparison.append(("QAT, the configured callback", qat.val_loss))
    result.model = _describe_model(module)
    return result
