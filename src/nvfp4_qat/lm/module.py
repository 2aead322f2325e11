"""The LightningModule that trains a causal LM, and the measurements the summary reports.

:class:`CausalLMModule` wraps any network that maps ``input_ids`` to logits (or to an output with
``.logits``, as Hugging Face models do), trains it with AdamW and a warm-up + cosine schedule, and
validates with the token-weighted mean cross-entropy and its perplexity. At every validation of a
fit it records ``{"step", "val_loss", "weight_mse"}`` in :attr:`CausalLMModule.history`, where
``weight_mse`` is the NVFP4 weight error at the current (possibly stale) scales: between two
recalibrations it shows how far the weights drift from their scales.
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

__all__ = ["CausalLMModule", "TokenThroughput", "quantized_weight_mse"]


@torch.no_grad()
def quantized_weight_mse(model: nn.Module) -> float | None:
    """Element-weighted mean of ``(fake_quant(w) - w)^2`` over all NVFP4 layers, in fp32.

    The same quantity as the recalibration report's ``mse_before``/``mse_after`` (it uses the
    same :func:`~nvfp4_qat.recalibration.weight_sse`), measured at the scales in use right now.
    Returns ``None`` when the model holds no NVFP4 layer (full-precision stage).
    """
    from nvfp4_qat.modules import NVFP4Linear
    from nvfp4_qat.recalibration import weight_sse

    sse, numel = None, 0
    for layer in model.modules():
        if isinstance(layer, NVFP4Linear):
            layer_sse, layer_numel = weight_sse(layer)
            sse = layer_sse if sse is None else sse + layer_sse  # stays on device: one sync at the end
            numel += layer_numel
    return None if sse is None else float(sse) / numel


class CausalLMModule(pl.LightningModule):
    """Next-token training of ``net`` with validation loss and perplexity.

    Args:
        net: maps ``input_ids`` ``(batch, seq)`` to logits ``(batch, seq, vocab)`` or to an
            object with ``.logits``.
        lr: peak learning rate (the command sets it per stage from ``stages.<name>.lr``).
        weight_decay: AdamW decay of the matrices (biases and norms are not decayed).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * lr`` at the
            fit's last optimizer step (``max_steps``, or epochs x batches; none if unbounded).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.lr = lr
        self.history: list[dict] = []
        self.last_val_loss: float | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """Ids the network's embedding accepts."""
        if hasattr(self.net, "get_input_embeddings"):
            return self.net.get_input_embeddings().num_embeddings
        return int(self.net.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.net(input_ids)
        return getattr(out, "logits", out)

    def _token_losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        # fp32 cross-entropy even under bf16-mixed: the loss is the number everything is judged by.
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._token_losses(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        losses = self._token_losses(batch)
        self._val_sum += losses.double().sum()
        self._val_count += losses.numel()

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over every rank's batches (one all-reduce per validation).
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = (total / count).float()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())
        if self.trainer.sanity_checking:
            return
        self.last_val_loss = float(loss)
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.history.append(
                {
                    "step": self.trainer.global_step,
                    "val_loss": self.last_val_loss,
                    "weight_mse": quantized_weight_mse(self),
                }
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A QAT checkpoint holds NVFP4 layers: quantize this fresh module the same way first, so
        # that CausalLMModule.load_from_checkpoint(path, net=...) works without further code.
        from nvfp4_qat.callback import restore_quantization

        restore_quantization(self, checkpoint)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=tuple(hp.betas),
        )
        # Optimizer steps of this fit (max_steps, or epochs x batches); inf: no decay after warm-up.
        total = float(self.trainer.estimated_stepping_batches)
        warmup = int(min(hp.warmup_steps, max(total - 1, 0)))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if math.isinf(total):
                return 1.0
            progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TokenThroughput(pl.Callback):
    """Training tokens per second over a fit, validation pauses excluded.

    Recalibrations inside the training loop count as training time (they are part of its cost).
    CUDA is synchronised only where the clock pauses or resumes, never per step.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._start: float | None = None

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._sync(trainer)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += batch[0].numel() * trainer.world_size

    def _pause(self, trainer: pl.Trainer) -> None:
        if self._start is not None:
            self._sync(trainer)
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._pause(trainer)
