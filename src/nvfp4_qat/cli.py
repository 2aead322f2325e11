"""The ``nvfp4-qat`` command (also ``python -m nvfp4_qat``): compose, train, summarise.

``nvfp4-qat`` alone runs the embedded default (a small GPT on the Python standard library's own
source, a full-precision stage, then NVFP4 QAT with periodic recalibration; a few minutes on a
2-core CPU). Everything is a Hydra config under ``nvfp4_qat/conf`` (the repository's ``conf/``
and ``recipes/``), so the usual Hydra command line applies::

    nvfp4-qat recipe=comparison                     # the five-way comparison table
    nvfp4-qat calibrator=reference stages.qat.steps=500
    nvfp4-qat -m callback.every_n_train_steps=10,50,200   # multirun, one job per value
    nvfp4-qat --cfg job                             # print the composed config, run nothing

Each job writes into its Hydra run directory: logs per stage, ``summary.txt``/``summary.json``
and ``nvfp4_qat.png``. Mistakes a user can fix (unknown option, missing model directory, a GPU
setting without a GPU, ``calibrator=triton`` where Triton cannot run) end with a one-paragraph
message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nvfp4_qat.lm.checks import UsageError, check_group_choices, normalize_overrides, preflight

__all__ = ["CONFIG_NAME", "CONFIG_PATH", "main", "run"]

#: Where the configs live once installed (``conf/`` and ``recipes/`` of the repository).
CONFIG_PATH = "pkg://nvfp4_qat.conf"
#: The primary config (``conf/nvfp4_qat.yaml``).
CONFIG_NAME = "nvfp4_qat"
PLOT_NAME = "nvfp4_qat.png"

log = logging.getLogger("nvfp4_qat")


def _fail(err: BaseException) -> None:
    message = textwrap.fill(
        f"nvfp4-qat: error: {err}", width=100, break_long_words=False, break_on_hyphens=False
    )
    print(message, file=sys.stderr)
    sys.exit(2)


def _usage_error_in(err: BaseException) -> UsageError | None:
    # Hydra wraps errors raised while instantiating a `_target_`; look through the chain.
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UsageError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run(cfg: DictConfig, out_dir: Path | None = None) -> str | None:
    """Run one composed job; write plot and summary to ``out_dir`` (default: Hydra's run dir).

    Returns:
        The summary text on the global rank zero (which prints and writes it), else ``None``.

    Raises:
        UsageError: a mistake in the config (see :mod:`nvfp4_qat.lm.checks`).
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from nvfp4_qat.lm.console import setup_cpu_threads, setup_logging
    from nvfp4_qat.lm.report import output_files, plot_run, write_summary
    from nvfp4_qat.lm.run import run_job

    preflight(cfg)
    setup_logging()
    threads = setup_cpu_threads(cfg.trainer.get("accelerator"))
    if threads:
        log.info(threads)
    result = run_job(cfg)
    if rank_zero_only.rank != 0:
        return None
    out = Path(out_dir if out_dir is not None else HydraConfig.get().runtime.output_dir)
    plot_path = plot_run(result, out / PLOT_NAME) if cfg.plot else None
    files = output_files(out, cfg.get("callback", {}).get("export_path"))
    text = write_summary(result, out, plot_path, files)
    print("\n" + text, flush=True)
    return text


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as err:
        usage = _usage_error_in(err)
        if usage is None:
            raise
        _fail(usage)


def main() -> None:
    """Console-script entry point: check option names, then hand ``sys.argv`` to Hydra."""
    try:
        check_group_choices(sys.argv[1:])
        sys.argv[1:] = normalize_overrides(sys.argv[1:])
    except UsageError as err:
        _fail(err)
    _hydra_main()


if __name__ == "__main__":
    main()
