"""Checks that turn the mistakes users make on the command line into one-paragraph messages.

Each check raises :class:`UsageError` with a message that says what was wrong and what to type
instead; ``nvfp4-qat`` prints it without a traceback and exits with status 2. The checks run
before anything heavy (composition-time names first, then the composed config), so a typo costs
a second, not a failed run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib import resources

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIG_GROUPS", "UsageError", "check_group_choices", "group_options", "preflight"]

#: The config groups under ``conf/`` (``recipe`` is the top-level ``recipes/`` directory).
CONFIG_GROUPS = ("calibrator", "quant", "callback", "model", "data", "trainer", "logger", "recipe")
_GROUP_HELP = {
    "calibrator": "the calibrator picks the block-scale sweep",
    "recipe": "a recipe is a complete experiment, listed in recipes/README.md",
}
# A plain option list such as `triton` or `10,50,200`; sweeps like choice(...) are left to Hydra.
_PLAIN_VALUES = re.compile(r"^[\w.\-/]+(,[\w.\-/]+)*$")
# Flags that bring in config directories we cannot see, so unknown names may be theirs.
_FOREIGN_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


class UsageError(ValueError):
    """A mistake in the command line or the config that the user can fix by changing it."""


def group_options(group: str) -> list[str]:
    """The option names of one config group shipped in ``nvfp4_qat.conf``, sorted."""
    folder = resources.files("nvfp4_qat.conf").joinpath(group)
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def check_group_choices(argv: Sequence[str]) -> None:
    """Refuse ``group=option`` overrides that name an option this package does not ship.

    Only plain values are checked (``calibrator=triton``, ``recipe=a,b``); when the command line
    adds config directories (``hydra.searchpath``, ``--config-dir``), unknown names may live
    there, so the check stands aside and Hydra reports them.

    Raises:
        UsageError: naming the group, the unknown option and the available ones.
    """
    if any(arg.split("=")[0] in _FOREIGN_CONFIG_FLAGS or "searchpath" in arg for arg in argv):
        return
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~").split("@")[0]
        if key not in CONFIG_GROUPS or not _PLAIN_VALUES.match(value):
            continue
        known = group_options(key)
        for option in value.split(","):
            if option != "null" and option not in known:
                what = _GROUP_HELP.get(key, f"`{key}` is a config group")
                raise UsageError(
                    f"unknown {key} '{option}' ({what}). Available: {', '.join(known)}. "
                    f"Pick one, e.g. `nvfp4-qat {key}={known[0]}`; to add your own, put a YAML "
                    f"file in a directory of yours with a `{key}/` folder and add it with "
                    f"`hydra.searchpath=[file:///path/to/dir]`."
                )


def preflight(cfg: DictConfig) -> None:
    """Check a composed config before anything is instantiated.

    Raises:
        UsageError: a required value (``???``) is unset, ``trainer.max_steps`` is set (the
            stages own it), a GPU-only setting on a machine without CUDA, ``calibrator=triton``
            where the kernel cannot run, or ``transformers`` missing for the Hugging Face model.
    """
    missing = _missing_keys(cfg)
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        hint = " (a local model directory)" if "model.net.path" in missing else ""
        raise UsageError(
            f"required value(s) not set: {', '.join(missing)}{hint}. Add them to the command "
            f"line, e.g. `nvfp4-qat {example}`."
        )
    if "max_steps" in cfg.trainer:
        raise UsageError(
            "trainer.max_steps is set by the command for each stage; use stages.fp.steps and "
            "stages.qat.steps instead (e.g. `nvfp4-qat stages.qat.steps=500`)."
        )
    on_cuda = _trainer_uses_cuda(cfg)
    _check_calibrator(cfg.calibrator.backend, on_cuda)
    net_target = str(cfg.model.get("net", {}).get("_target_", ""))
    if net_target.endswith("load_hf_causal_lm") or cfg.data.get("tokenizer") == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError(
                "this config loads a Hugging Face model or tokenizer, which needs the "
                "`transformers` package: pip install 'nvfp4_qat[hf]'."
            ) from None


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    # Like OmegaConf.missing_keys, but never resolves interpolations (one that points at a
    # missing value, e.g. data.tokenizer_path: ${model.net.path}, would raise there).
    found = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation():
            found += _missing_keys(child, f"{prefix}{key}.")
    return found


def _trainer_uses_cuda(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"trainer.accelerator={accelerator} needs a CUDA GPU, and PyTorch sees none on "
                f"this machine (torch {torch.__version__}). Run on the CPU with `trainer=cpu` "
                f"(the GPU recipe's model is large: on a CPU start with the default recipe), or "
                f"run on a GPU machine with a CUDA build of PyTorch."
            )
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def _check_calibrator(backend: str, on_cuda: bool) -> None:
    if backend != "triton":
        return
    from nvfp4_qat.sweep import triton_available

    if not triton_available():
        raise UsageError(
            "calibrator=triton needs the `triton` package, which is not importable here "
            "(pip install triton on Linux with a CUDA GPU). Use `calibrator=reference` (the exact "
            "PyTorch sweep, same scales) or `calibrator=auto` (Triton when it can run)."
        )
    if not on_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise UsageError(
            "calibrator=triton runs the fused Triton sweep kernel, which needs the model on a "
            "CUDA GPU, and this run trains on the CPU. Use `calibrator=reference` or "
            "`calibrator=auto` (same scales), add `trainer=gpu` on a GPU machine, or set "
            "TRITON_INTERPRET=1 to run the kernel in Triton's (slow) CPU interpreter."
        )
