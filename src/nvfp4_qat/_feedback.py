"""What the recalibration callback tells the user and the loggers: progress lines, logger steps.

Kept apart from :mod:`nvfp4_qat.callback` so that the callback's hooks stay a few lines each.
A recalibration stops Lightning's progress bar while it runs; a line before and one after say
why, through the bar's own ``print`` (``tqdm.write`` / rich's console), which keeps the bar intact on
a terminal and adds plain lines when the output goes to a file (without a bar: Lightning's INFO log).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

__all__ = ["logger_step", "say", "start_line", "done_line"]


def logger_step(trainer: Any, reason: str) -> int:
    """The step index Lightning's own logging gives the same point of training.

    Lightning logs what it measures after the n-th optimizer step (``trainer.global_step == n``)
    at step ``n - 1`` (its loop counts "batches that stepped" after the batch-end hooks and the
    validation they trigger); after the epoch or fit has ended, and before any step, at ``n``.
    Recalibration metrics logged this way land on the row of the ``val/loss`` of the same point.
    """
    step = trainer.global_step
    return max(step - 1, 0) if reason == "step" else step


@rank_zero_only
def say(trainer: Any, text: str) -> None:
    """Print one line beside the progress bar (or log it at INFO when there is none), on rank zero."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and getattr(bar, "is_enabled", False):
        bar.print(text)
    else:
        rank_zero_info(text)


def start_line(reason: str, step: int, n_layers: int, numel: int) -> str:
    """``NVFP4 recalibration after step 50: 16 layers, 0.79M weights ...``"""
    when = {"fit_start": "at fit start", "fit_end": "at fit end"}.get(reason, f"after step {step}")
    return f"NVFP4 recalibration {when}: {n_layers} layers, {numel / 1e6:.2f}M weights ..."


def done_line(seconds: float, metrics: dict[str, float], note: str = "") -> str:
    """``... done in 0.21 s: weight MSE -3.1%, 12.0% of block scales moved``; ``note`` follows the
    time (the report's compile note)."""
    return (
        f"... done in {seconds:.2f} s{note}: weight MSE {-100 * metrics['rel_improvement']:+.1f}%, "
        f"{100 * metrics['changed_fraction']:.1f}% of block scales moved"
    )
