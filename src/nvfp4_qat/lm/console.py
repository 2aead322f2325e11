"""What ``nvfp4-qat`` does about the machine and the terminal it runs on.

* CPU threads: PyTorch starts one intra-op thread per core. When anything else runs on the
  machine, those threads wait for each other at every operation (a busy 2-core machine ran the
  reference sweep 5-13x slower with 2 threads than with 1, BENCHMARKS.md). :func:`cpu_threads`
  takes only the cores that are free.
* Logging: Lightning's records reach Hydra's handlers (the console and the run directory's
  ``nvfp4_qat.log``) once, and the banners every ``Trainer`` prints (GPU/TPU availability, tips
  about other Lightning products) appear once per run instead of once per stage.
* Progress: on a terminal, Lightning's own bar; when the output goes to a file, :class:`LineProgress`
  writes one plain line per validation instead of a bar redrawn with ``\\r`` and escape codes.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["LineProgress", "cpu_threads", "progress_callbacks", "setup_cpu_threads", "setup_logging"]

log = logging.getLogger(__name__)

#: Environment variables by which a user chooses the thread count; then the command keeps it.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Lightning messages printed by every Trainer (or ModelCheckpoint); shown once per process.
_ONCE_PREFIXES = ("GPU available", "TPU available", "HPU available", "💡 Tip", "`Trainer(limit_")


def cpu_threads(cores: int | None = None, load: float | None = None) -> int:
    """Intra-op threads for a CPU run: the usable cores minus those busy (1-minute load), >= 1.

    Args:
        cores: usable cores (default: this process's CPU affinity).
        load: runnable processes besides this one (default: the 1-minute load average).
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - math.ceil(load - 0.5)))


def setup_cpu_threads(accelerator: str | None) -> str | None:
    """Set torch's thread count for a CPU run unless the user chose one; return a line saying so."""
    if accelerator not in (None, "cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
        return None
    chosen = [v for v in THREAD_VARIABLES if os.environ.get(v)]
    if chosen:
        return f"CPU run with {torch.get_num_threads()} torch thread(s) ({chosen[0]} is set)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n = cpu_threads(cores, load)
    torch.set_num_threads(n)
    return (
        f"CPU run with {n} torch thread(s): {cores} cores, load average {load:.1f} "
        f"(set OMP_NUM_THREADS to choose)"
    )


class _OncePerRun(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_ONCE_PREFIXES):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def setup_logging() -> None:
    """Route Lightning's records through Hydra's handlers only, its banners once per run.

    Lightning adds its own console handler to the ``lightning`` logger; under Hydra, whose handlers
    sit on the root logger (console and ``<run dir>/nvfp4_qat.log``), every record then printed twice.
    """
    root_handlers = logging.getLogger().handlers
    light = logging.getLogger("lightning")
    if root_handlers:
        for handler in list(light.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                light.removeHandler(handler)
        light.propagate = True
    once = _OncePerRun()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(once)


class LineProgress(ProgressBar):
    """A progress "bar" for output that is not a terminal: one plain line per validation
    (``stage qat: step 50/150, train/loss 1.93, val/loss 1.95, 41 s``) and one per stage end."""

    def __init__(self, stage: str = "") -> None:
        super().__init__()
        self.stage = stage
        self._enabled = True
        self._start = time.perf_counter()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(*args, sep=sep, flush=True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def _line(self, trainer: Any) -> str:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "v_num"
        )
        elapsed = time.perf_counter() - self._start
        prefix = f"stage {self.stage}: " if self.stage else ""
        return (
            f"{prefix}step {trainer.global_step}/{total}"
            + (f", {shown}" if shown else "")
            + (f", {elapsed:.0f} s")
        )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.print(self._line(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.print(self._line(trainer) + " (done)")


def progress_callbacks(enable_progress_bar: bool, stage: str = "", stream: Any = None) -> list[Any]:
    """``[LineProgress]`` when a progress bar is wanted but ``stream`` (stdout) is no terminal."""
    stream = sys.stdout if stream is None else stream
    if not enable_progress_bar or (hasattr(stream, "isatty") and stream.isatty()):
        return []
    return [LineProgress(stage)]
