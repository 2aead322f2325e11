"""``NVFP4Recalibration``: a Lightning callback for NVFP4 QAT whose block scales follow the weights.

Life cycle:

* ``setup`` (every stage, before a checkpoint is restored and before optimizers exist): refuses a
  strategy it cannot serve (FSDP1, DeepSpeed), then swaps the model's ``nn.Linear`` layers for
  :class:`~nvfp4_qat.NVFP4Linear` if it is not quantized yet, so ``fit/validate/test(ckpt_path=...)``
  find the scale buffers they restore.
* ``on_train_start`` (after restore and sanity check): one calibration when ``at_fit_start`` and
  this run has not calibrated yet (a resumed run has, and keeps its restored scales).
* ``on_train_batch_end``: after an optimizer step (``trainer.global_step`` counts optimizer steps,
  never micro-batches) when :meth:`NVFP4Recalibration.should_recalibrate` says so.
* ``on_train_epoch_end``: the epoch schedule; ``on_fit_end``: ``at_fit_end`` and the export.

Recalibration runs under ``torch.no_grad()`` between optimizer steps, before validation and before
``ModelCheckpoint`` (Lightning runs checkpoint callbacks last), so validation and checkpoints
always see one consistent set of scales. Under ``torch.distributed`` (DDP, FSDP2) the sweep is split
across the ranks (:func:`~nvfp4_qat.recalibrate` does it) and every rank ends with
the same scales. Between recalibrations the callback touches no weight and syncs nothing: its
per-step hook compares two integers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from nvfp4_qat._feedback import done_line, logger_step, say, start_line
from nvfp4_qat._validation import BACKENDS, METHODS
from nvfp4_qat.config import QATConfig
from nvfp4_qat.policy import InputMoments, RecalibrationPolicy, resolve_policy
from nvfp4_qat.quantize import calibration_is_current, nvfp4_layers, quantize_model
from nvfp4_qat.recalibration import ON_NONFINITE, RecalibrationReport, recalibrate

__all__ = ["NVFP4Recalibration", "check_strategy", "restore_quantization"]

#: Key under which the callback stores what ``restore_quantization`` needs in a checkpoint.
CHECKPOINT_KEY = "nvfp4_qat"


def check_strategy(strategy: Any) -> None:
    """Refuse a Lightning strategy whose parameters the recalibration cannot read correctly.

    FSDP1 (``FSDPStrategy``) flattens the parameters of a wrapped module into one sharded
    ``FlatParameter``, and DeepSpeed partitions them in its own way (ZeRO-3: empty placeholders), so
    a layer's weight is not its rows. Supported: a single device, DDP, and FSDP2 through
    ``ModelParallelStrategy`` with ``fully_shard``.

    Raises:
        ValueError: ``strategy`` is an ``FSDPStrategy`` or a ``DeepSpeedStrategy`` (or a subclass).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    for cls, why in (
        (FSDPStrategy, "FSDP1 keeps each wrapped module's parameters in one flat, sharded FlatParameter"),
        (DeepSpeedStrategy, "DeepSpeed partitions the parameters outside the modules' own tensors"),
    ):
        if isinstance(strategy, cls):
            name = cls.__name__ if type(strategy) is cls else f"{type(strategy).__name__} (a {cls.__name__})"
            raise ValueError(
                f"NVFP4Recalibration does not support the strategy {name}: {why}, so "
                "a layer's block scales cannot be computed from its weight. Supported: a single device, "
                "DDP (strategy='ddp'), and FSDP2 (ModelParallelStrategy with fully_shard in configure_model)"
            )


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    return value


def _as_config(value: Any) -> QATConfig:
    if value is None:
        return QATConfig()
    if isinstance(value, QATConfig):
        return value
    if hasattr(value, "items"):  # dict, or an OmegaConf DictConfig from Hydra
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(value, DictConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except ImportError:  # pragma: no cover - hydra-core is a dependency
            pass
        return QATConfig.from_dict(dict(value))
    raise TypeError(f"`quant_config` must be a QATConfig, a dict or None, got {type(value).__name__}")


def sanitize_metric_name(name: str) -> str:
    """Layer name -> a metric key every logger accepts (``layers.0.attn`` -> ``layers_0_attn``)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "model"


def _fsdp2_modules(module: Any) -> list[Any]:
    """The submodules that FSDP2's ``fully_shard`` manages (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has it only here
        from torch.distributed._composable.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def restore_quantization(module: Any, checkpoint: dict[str, Any]) -> bool:
    """Make a plain model ready to load a QAT checkpoint written with this callback.

    Call it from ``LightningModule.on_load_checkpoint`` so that
    ``LightningModule.load_from_checkpoint`` (which does not run callbacks) finds the NVFP4 layers
    and scale buffers the checkpoint holds. The same layers are swapped (by name) with the saved
    config; the scales then come from the checkpoint's state dict.

    Without it the load fails with ``Unexpected key(s) in state_dict: ...block_amax...``;
    :func:`nvfp4_qat.checkpoint.explain_load_errors` turns that into a message naming this fix.

    Returns:
        True if layers were swapped, False if the checkpoint has no NVFP4 layers or the module is
        already quantized.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not meta or nvfp4_layers(module):
        return False
    import glob

    names = tuple(glob.escape(name) for name in meta["layers"])  # names, not patterns: h.h[0] is literal
    config = QATConfig.from_dict(meta["config"]).replace(include=names, exclude=(), init_calibration="max")
    quantize_model(module, config)
    return True


def _check_export_target(export_path: str, trainer: pl.Trainer) -> None:
    """Refuse, before training, an export path the end-of-fit export could not or must not replace.

    ``NVFP4Recalibration(export_path=...)`` exports at the end of fit by replacing the folder as a
    whole, so the folder must be new, empty or a previous export of this package, and must not
    hold the run's own outputs (checkpoints, logs). ``setup`` runs this for the ``fit`` stage.
    """
    from pathlib import Path

    from nvfp4_qat._export_files import check_export_path

    try:
        target = check_export_path(export_path, overwrite=True).resolve()
    except (ValueError, OSError) as err:
        raise ValueError(f"`export_path` {export_path!r} cannot be used: {err}") from err
    outputs = [("default_root_dir", trainer.default_root_dir)]
    outputs += [("logger save_dir", logger.save_dir) for logger in trainer.loggers]
    outputs += [("ModelCheckpoint dirpath", cb.dirpath) for cb in trainer.checkpoint_callbacks]
    for label, folder in outputs:
        if folder is not None and target in (p := Path(folder).expanduser().resolve(), *p.parents):
            raise ValueError(
                f"`export_path` {export_path!r} would replace the run's {label} {folder}: the export "
                "replaces its folder as a whole at the end of fit; choose a folder of its own"
            )


class NVFP4Recalibration(Callback):
    """Recalibrate NVFP4 block scales during QAT with an exact MSE sweep.

    Args:
        every_n_train_steps: recalibrate after every n-th optimizer step (0: never by steps).
        every_n_epochs: recalibrate at the end of every n-th training epoch (0: never by epochs).
        start_step: first optimizer-step index (zero-based) after which recalibration may run.
        stop_step: optimizer-step index from which on scales stay frozen (``None``: never freeze).
            Moving scales late in training hurts; the window ``[start_step, stop_step)`` bounds
            the step and epoch schedules (not ``at_fit_start``/``at_fit_end``).
        at_fit_start: quantize the model in ``setup`` if needed and calibrate once when training
            starts (skipped when resuming a run that already did).
        at_fit_end: recalibrate once more when fit ends.
        backend: sweep backend, ``"auto"`` | ``"triton"`` | ``"reference"``.
        method: sweep method, ``"pruned"`` | ``"exhaustive"`` (same result; pruned is faster).
        quant_config: :class:`~nvfp4_qat.QATConfig` (or a dict of its fields) used to quantize a
            model that is not quantized yet.
        log_per_layer: also log each layer's weight MSE before/after and changed-scale fraction.
        on_nonfinite: a non-finite weight at recalibration: ``"raise"`` (on every rank, before any
            scale is written) or ``"skip"`` the layer (it keeps its scales; a warning names it).
        export_path: if set, export a deployable NVFP4 checkpoint there when fit ends.
        policy: how a recalibration chooses and accepts new scales: a preset name of
            :data:`~nvfp4_qat.policy.POLICIES` or a :class:`~nvfp4_qat.policy.RecalibrationPolicy`
            (see BENCHMARKS.md, "QAT quality", for what each does to the trained model). The
            ``gradient`` criterion reads the Adam state of the (single) optimizer; ``activation``
            gathers input statistics with forward hooks during training (freed after each
            recalibration); ``loss_check`` evaluates ``loss_check_batches`` validation batches.
            The calibration at fit start is always the plain MSE sweep.
        settle_fraction: no step or epoch recalibration in this last fraction of the training
            steps (``trainer.estimated_stepping_batches``), so the weights settle on the final
            scales; 0 recalibrates to the end. Combined with ``stop_step`` (the earlier wins).
        loss_check_batches: validation batches (the first ones of the validation dataloader) a
            ``loss_check`` policy evaluates before and after each recalibration, with
            ``training_step`` in eval mode and logging muted.
    """

    def __init__(
        self,
        every_n_train_steps: int = 0,
        every_n_epochs: int = 0,
        start_step: int = 0,
        stop_step: int | None = None,
        at_fit_start: bool = True,
        at_fit_end: bool = False,
        backend: str = "auto",
        method: str = "pruned",
        quant_config: QATConfig | dict | None = None,
        log_per_layer: bool = False,
        on_nonfinite: str = "raise",
        export_path: str | None = None,
        policy: str | RecalibrationPolicy = "loss_check_layer",
        settle_fraction: float = 0.4,
        loss_check_batches: int = 2,
    ) -> None:
        self.every_n_train_steps = _non_negative_int(every_n_train_steps, "every_n_train_steps")
        self.every_n_epochs = _non_negative_int(every_n_epochs, "every_n_epochs")
        self.start_step = _non_negative_int(start_step, "start_step")
        if stop_step is not None and (_non_negative_int(stop_step, "stop_step") <= self.start_step):
            raise ValueError(f"`stop_step` must be None or > start_step={start_step}, got {stop_step}")
        self.stop_step = stop_step
        for name, value in (
            ("at_fit_start", at_fit_start),
            ("at_fit_end", at_fit_end),
            ("log_per_layer", log_per_layer),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}")
        self.at_fit_start, self.at_fit_end, self.log_per_layer = at_fit_start, at_fit_end, log_per_layer
        for name, value, allowed in (
            ("backend", backend, BACKENDS),
            ("method", method, METHODS),
            ("on_nonfinite", on_nonfinite, ON_NONFINITE),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        self.backend, self.method, self.on_nonfinite = backend, method, on_nonfinite
        self.quant_config = _as_config(quant_config)
        self.export_path = None if export_path is None else str(export_path)
        try:
            self.policy = resolve_policy(policy)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`policy`: {err}") from None
        if isinstance(settle_fraction, bool) or not isinstance(settle_fraction, (int, float)):
            raise ValueError(f"`settle_fraction` must be a number in [0, 1), got {settle_fraction!r}")
        if not 0.0 <= settle_fraction < 1.0:
            raise ValueError(f"`settle_fraction` must be in [0, 1), got {settle_fraction!r}")
        self.settle_fraction = float(settle_fraction)
        self.loss_check_batches = _non_negative_int(loss_check_batches, "loss_check_batches")
        if self.policy.checks_loss and self.loss_check_batches == 0:
            raise ValueError("`loss_check_batches` must be >= 1 with a loss_check policy, got 0")
        self._settle_stop: int | None = None  # the settle window's first step, set at train start
        self._moments: InputMoments | None = None
        self._check_batches: list[Any] = []

        # State saved in checkpoints (see state_dict): the guards that keep one optimizer step or
        # epoch from firing twice, and the history of recalibrations.
        self._last_step = -1  # trainer.global_step at the last recalibration
        self._last_checked_step = 0  # the last trainer.global_step the schedule was asked about
        self._last_epoch = -1
        self._calibrated_at_start = False
        self.history: list[dict[str, Any]] = []
        self.last_report: RecalibrationReport | None = None

    @property
    @override
    def state_key(self) -> str:
        # Stable across argument changes, so a resumed run with another schedule keeps its state.
        return "NVFP4Recalibration"

    def should_recalibrate(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """The schedule. Override to customise; both indices are zero-based.

        Called after every optimizer step with ``step_idx`` (index of the step just taken:
        ``trainer.global_step - 1``) and ``epoch_idx=None``; and at the end of every training
        epoch with ``epoch_idx`` and ``step_idx`` = the index of the epoch's last optimizer step.
        Under DDP/FSDP2 it must answer the same on every rank: a recalibration is a collective.
        """
        if step_idx is None or step_idx < self.start_step:
            return False
        if self.stop_step is not None and step_idx >= self.stop_step:
            return False
        if self._settle_stop is not None and step_idx >= self._settle_stop:
            return False
        if epoch_idx is None:
            return self.every_n_train_steps > 0 and (step_idx + 1) % self.every_n_train_steps == 0
        return self.every_n_epochs > 0 and (epoch_idx + 1) % self.every_n_epochs == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        if stage == "fit" and self.export_path is not None:
            _check_export_target(self.export_path, trainer)
        if not nvfp4_layers(pl_module):
            quantize_model(pl_module, self.quant_config)
            if not nvfp4_layers(pl_module):
                rank_zero_warn("NVFP4Recalibration: the model has no nn.Linear layer to quantize.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The model is sharded by now (configure_model runs after setup). The export runs on rank
        # zero alone, which cannot gather FSDP2 shards: refuse before training, not at its end.
        if self.export_path is not None and _fsdp2_modules(pl_module):
            raise ValueError(
                "`export_path` is not supported with FSDP2 (fully_shard): the weights are sharded "
                "DTensors and the export runs on rank zero only; train without it and export the "
                "gathered model (e.g. loaded from a full-state-dict checkpoint) with export_nvfp4"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare_policy(trainer, pl_module)
        if self.at_fit_start and not self._calibrated_at_start:
            # Skip a calibration quantize_model has just done (not under DDP: ranks must agree).
            if trainer.world_size > 1 or not calibration_is_current(pl_module):
                self._recalibrate(trainer, pl_module, "fit_start")
            self._calibrated_at_start = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step only moves after an optimizer step, so micro-batches of one accumulation
        # window see the same value: the guard asks the schedule once per optimizer step.
        step = trainer.global_step
        if step <= self._last_checked_step:
            return
        self._last_checked_step = step
        if self.should_recalibrate(step_idx=step - 1):
            self._recalibrate(trainer, pl_module, "step")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        if epoch > self._last_epoch and self.should_recalibrate(step_idx=step - 1, epoch_idx=epoch):
            self._last_epoch = epoch
            if step != self._last_step:  # the step schedule may have just done it
                self._recalibrate(trainer, pl_module, "epoch")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_policy()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release_policy()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self._recalibrate(trainer, pl_module, "fit_end")
        if self.export_path is not None:
            if trainer.is_global_zero:
                from nvfp4_qat.export import export_nvfp4

                path = export_nvfp4(pl_module, self.export_path, overwrite=True)
                rank_zero_info(f"NVFP4Recalibration: exported the NVFP4 checkpoint to {path}")
            trainer.strategy.barrier("nvfp4_export")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        layers = [name for name, _ in nvfp4_layers(pl_module)]
        checkpoint[CHECKPOINT_KEY] = {"layers": layers, "config": asdict(self.quant_config)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "last_checked_step": self._last_checked_step,
            "last_epoch": self._last_epoch,
            "calibrated_at_start": self._calibrated_at_start,
            "history": [dict(h) for h in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self._last_checked_step = state_dict["last_checked_step"]
        self._last_epoch = state_dict["last_epoch"]
        self._calibrated_at_start = state_dict["calibrated_at_start"]
        self.history = [dict(h) for h in state_dict["history"]]

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        layers = nvfp4_layers(pl_module)
        numel = sum(m.weight.numel() for _, m in layers)
        say(trainer, start_line(reason, trainer.global_step, len(layers), numel))
        start = time.perf_counter()
        # Every rank gets here at the same step (the schedule depends on global_step only). Plain
        # recalibrate() without a process group, the sweep split across the ranks with one.
        policy = self.policy
        if reason == "fit_start":
            # The initial calibration is the exact MSE sweep whatever the policy (what the QAT
            # quality benchmark's rows start from; no statistics or optimizer state exist yet).
            policy = RecalibrationPolicy()
        elif reason == "fit_end" and (policy.needs_input_moments or policy.needs_optimizer):
            # The plain criterion keeps the same meaning for every run. Acceptance rules stay.
            policy = dataclasses.replace(policy, criterion="mse")
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        if policy.needs_optimizer and optimizer is None:
            raise ValueError(
                f"policy criterion 'gradient' needs exactly one optimizer, the trainer has {len(trainer.optimizers)}"
            )
        report = recalibrate(
            pl_module,
            self.backend,
            self.method,
            self.on_nonfinite,
            policy,
            optimizer,
            self._moments,
            (lambda: self._held_out_loss(trainer, pl_module)) if policy.checks_loss else None,
        )
        if self._moments is not None:
            self._moments.reset()  # statistics of the next interval only; frees the sums
        seconds = time.perf_counter() - start
        self._last_step = trainer.global_step
        self.last_report = report
        metrics = self._metrics(report, seconds)
        say(trainer, done_line(seconds, metrics, report.compile_note))
        self.history.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "reason": reason, **metrics}
        )
        if self.log_per_layer:
            metrics.update(self._layer_metrics(report))
        # Every rank computed the same values without a collective; loggers write on rank zero
        # only, so nothing here waits on another rank.
        for logger in trainer.loggers:
            step = logger_step(trainer, reason)  # the row of val/loss at the same point
            logger.log_metrics({f"nvfp4/{k}": v for k, v in metrics.items()}, step=step)

    def _prepare_policy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Settle window, input-statistics hooks and held-out batches for this fit."""
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        finite = isinstance(total, int) or (isinstance(total, float) and math.isfinite(total))
        self._settle_stop = (
            int(total * (1 - self.settle_fraction)) if self.settle_fraction and finite else None
        )
        if self.policy.needs_input_moments and self._moments is None:
            self._moments = InputMoments(nvfp4_layers(pl_module))
        if self.policy.checks_loss and not self._check_batches:
            self._check_batches = self._held_out_batches(trainer)

    def _held_out_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``loss_check_batches`` validation batches; without validation data, the first
        training batches (with a warning: they are not held out)."""
        for kind, attribute in (("val", "val_dataloaders"), ("train", "train_dataloader")):
            loaders = getattr(trainer, attribute)
            if loaders is None and trainer.datamodule is not None:
                loaders = getattr(trainer.datamodule, f"{kind}_dataloader")()
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            batches = list(itertools.islice(iter(loader), self.loss_check_batches)) if loader else []
            if batches:
                if kind == "train":
                    rank_zero_warn(
                        "NVFP4Recalibration: the loss check found no validation data and evaluates the "
                        f"first {len(batches)} training batches instead (not held out); give the "
                        "Trainer a val dataloader, or pass policy='mse'."
                    )
                return batches
        raise ValueError(
            f"policy {self.policy} checks the loss but the trainer has neither validation nor training "
            "batches to evaluate"
        )

    def _release_policy(self) -> None:
        if self._moments is not None:
            self._moments.remove()
            self._moments = None
        self._check_batches = []

    def _held_out_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Mean ``training_step`` loss over the held-out batches, eval mode, no logging, all ranks."""
        was_training = pl_module.training
        pl_module.eval()
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # instance attributes: muted
        try:
            total = 0.0
            for i, batch in enumerate(self._check_batches):
                out = pl_module.training_step(trainer.strategy.batch_to_device(batch), i)
                total += float(out["loss"] if isinstance(out, dict) else out)
            loss = torch.tensor(total / len(self._check_batches), device=pl_module.device)
            return float(trainer.strategy.reduce(loss, reduce_op="mean"))
        finally:
            del pl_module.log, pl_module.log_dict  # the class's methods again
            pl_module.train(was_training)

    def _metrics(self, report: RecalibrationReport, seconds: float) -> dict[str, float]:
        # The report's totals are the same on every rank (the distributed recalibration reduced
        # them): no cross-rank reduction here.
        # 0, not NaN, when every layer was skipped (what the torchmetrics metrics give for no elements)
        mse_before, mse_after = (report.mse_before, report.mse_after) if report.numel else (0.0, 0.0)
        return {
            "mse_before": mse_before,
            "mse_after": mse_after,
            "rel_improvement": (mse_before - mse_after) / mse_before if mse_before > 0 else 0.0,
            "sqnr_db": report.sqnr_db,
            "changed_fraction": report.changed_fraction,
            "seconds": seconds,
            **(
                {
                    "loss_before": report.loss_before,
                    "loss_after": report.loss_after,
                    "rolled_back": float(report.rolled_back),
                }
                if self.policy.checks_loss
                else {}
            ),
        }

    def _layer_metrics(self, report: RecalibrationReport) -> dict[str, float]:
        out = {}
        for row in report.layers:
            if row.skipped:
                continue
            key = f"layer/{sanitize_metric_name(row.name)}"
            out[f"{key}/mse_before"] = float(row.mse_before)
            out[f"{key}/mse_after"] = float(row.mse_after)
            out[f"{key}/changed_fraction"] = float(row.changed_fraction)
        return out
