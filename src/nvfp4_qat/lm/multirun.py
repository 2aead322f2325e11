"""Multirun helpers: one table for the whole sweep, and the full-precision stage trained once.

``nvfp4-qat -m callback=frozen,periodic`` runs one job per value. Jobs that differ only in what
happens after the full-precision stage (the callback, the quant config, the QAT stage) would each
train the same ``fp`` stage from the same seed; :func:`cached_fp_stage` keeps its weights and result
in the sweep directory, keyed by everything that decides them, so the later jobs load them instead.
:class:`MultirunTable` (a Hydra callback, registered in ``conf/nvfp4_qat.yaml``) writes
``multirun_summary.txt`` into the sweep directory when the sweep ends: one row per job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["MultirunTable", "cached_fp_stage", "fp_cache_key", "multirun_table"]

#: What decides the full-precision stage's weights (everything else can differ between jobs).
_FP_KEYS = ("model", "data", "trainer", "seed")


def fp_cache_key(cfg: DictConfig) -> str:
    """A hash of the config parts that decide the ``fp`` stage (model, data, trainer, seed, its steps
    and learning rate)."""
    parts = {k: cfg.get(k) for k in _FP_KEYS}
    parts["stage"] = cfg.stages.fp
    text = OmegaConf.to_yaml(
        OmegaConf.create({k: v for k, v in parts.items() if v is not None}), resolve=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sweep_dir() -> Path | None:
    """The multirun's sweep directory, or ``None`` outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def cached_fp_stage(cfg: DictConfig, module: torch.nn.Module, train: Callable[[], Any]) -> tuple[Any, bool]:
    """Run ``train()`` (the ``fp`` stage of ``module``) or, in a multirun where an earlier job ran
    the same stage, load its weights into ``module`` and return its result.

    Returns:
        ``(stage result, reused)``.
    """
    from nvfp4_qat.lm.run import StageResult

    sweep = _sweep_dir()
    if sweep is None:
        return train(), False
    base = sweep / ".fp_cache" / fp_cache_key(cfg)
    weights, meta = base.with_suffix(".pt"), base.with_suffix(".json")
    if weights.is_file() and meta.is_file():
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return StageResult(**json.loads(meta.read_text())), True
    result = train()
    base.parent.mkdir(parents=True, exist_ok=True)
    # Write under temporary names and rename: a job killed midway leaves no half-written cache.
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, f"{weights}.tmp")
    os.replace(f"{weights}.tmp", weights)
    Path(f"{meta}.tmp").write_text(json.dumps(dataclasses.asdict(result)))
    os.replace(f"{meta}.tmp", meta)
    return result, False


def multirun_table(sweep_dir: Path) -> str:
    """One row per job of a finished sweep: its overrides, its final QAT loss, its comparison rows."""
    rows, jobs = [], 0
    for job in sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        jobs += 1
        summary_file = job / "summary.json"
        overrides_file = job / ".hydra" / "overrides.yaml"
        # plain YAML: the overrides as typed (OmegaConf would turn "plot=true" into "plot=True")
        overrides = (
            " ".join(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else ""
        )
        if not summary_file.is_file():
            rows.append(f"{job.name:>4}  {overrides}: no summary.json (the job failed?)")
            continue
        summary = json.loads(summary_file.read_text())
        qat = next((s for s in summary["stages"] if s["name"] == "qat"), None)
        loss = qat["val_loss"] if qat and qat["val_loss"] is not None else float("nan")
        rows.append(f"{job.name:>4}  QAT val loss {loss:.4f}  {overrides}")
        for row in summary.get("comparison", []):
            value = "n/a" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
            rows.append(f"{'':>6}{row['variant']:<52} {value}")
    return "\n".join([f"nvfp4-qat multirun: {jobs} jobs in {sweep_dir}", *rows])


class MultirunTable(Callback):
    """Hydra callback: print and save ``multirun_summary.txt`` when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir():
            return
        text = multirun_table(sweep)
        (sweep / "multirun_summary.txt").write_text(text + "\n")
        print("\n" + text, flush=True)
