"""Checks that turn the mistakes users make on the command line into one-paragraph messages.

Each check raises :class:`UsageError` with a message that says what was wrong and what to type
instead; ``nvfp4-qat`` prints it without a traceback and exits with status 2. The checks run
before anything heavy (composition-time names first, then the composed config), so a typo costs
a second, not a failed run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "CONFIG_GROUPS",
    "UsageError",
    "check_group_choices",
    "group_options",
    "normalize_overrides",
    "preflight",
]

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


_MAX_STEPS_MESSAGE = (
    "trainer.max_steps is set by the command for each stage; use stages.fp.steps and "
    "stages.qat.steps instead (e.g. `nvfp4-qat stages.qat.steps=500`)."
)
# Groups whose default may be switched off; Hydra wants `~group` for that and crashes on `group=null`.
_OPTIONAL_GROUPS = ("logger",)


def normalize_overrides(argv: Sequence[str]) -> list[str]:
    """The command line as Hydra should see it, or a :class:`UsageError` for what Hydra reports badly.

    ``logger=null`` (what the config's comment offers) becomes ``~logger``: Hydra cannot set a
    group with a default to null. ``trainer.max_steps=N`` is refused with the package's message
    (Hydra would say "not in struct"; ``+trainer.max_steps`` reaches :func:`preflight`).
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "trainer.max_steps":
            raise UsageError(_MAX_STEPS_MESSAGE)
        if eq and key in _OPTIONAL_GROUPS and value == "null":
            arg = f"~{key}"
        out.append(arg)
    return out


def preflight(cfg: DictConfig) -> None:
    """Check a composed config before anything is instantiated.

    Raises:
        UsageError: a required value (``???``) is unset, ``trainer.max_steps`` is set (the
            stages own it), a step count, learning rate, seed or flag of the wrong type or range,
            a GPU-only setting on a machine without CUDA, ``calibrator=triton`` where the kernel
            cannot run, ``transformers`` missing for the Hugging Face model, a ``quant`` or
            ``callback`` its own constructor refuses (e.g. ``every_n_train_steps=-1``), an unusable
            ``callback.export_path``, or ``logger=tensorboard`` without tensorboard.
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
        raise UsageError(_MAX_STEPS_MESSAGE)
    _check_values(cfg)
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
    _check_objects(cfg)


def _check_values(cfg: DictConfig) -> None:
    # Plain values the command reads itself: a wrong type would surface as a raw TypeError deep in
    # the run, a negative step count as a run without limit (Lightning's max_steps=-1).
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r} (e.g. `nvfp4-qat seed=1`).")
    for stage in ("fp", "qat"):
        settings = cfg.get("stages", {}).get(stage)
        if settings is None:
            continue
        steps = settings.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UsageError(
                f"stages.{stage}.steps must be an integer >= 0 (optimizer steps; 0 skips the stage), "
                f"got {steps!r} (e.g. `nvfp4-qat stages.{stage}.steps=100`)."
            )
        lr = settings.get("lr")
        try:
            ok = float(lr) > 0 and not isinstance(lr, bool)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"stages.{stage}.lr must be a number > 0, got {lr!r} (e.g. 1.0e-3).")
    for key in ("compare", "plot"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise UsageError(f"{key} must be true or false, got {cfg[key]!r}.")


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_objects(cfg: DictConfig) -> None:
    # Build the cheap configured objects now, so that their own argument checks (which name the
    # argument) run before any training instead of after the full-precision stage.
    from hydra.utils import instantiate

    for group in ("quant", "callback"):
        if cfg.get(group) is None or "_target_" not in cfg[group]:
            continue
        try:
            obj = instantiate(cfg[group])
        except Exception as err:  # Hydra wraps the constructor's error; show the constructor's words
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise UsageError(f"{group}: {cause} (set it with `nvfp4-qat {group}.<key>=...`).") from None
        export_path = getattr(obj, "export_path", None) if group == "callback" else None
        if export_path is not None:
            from nvfp4_qat._export_files import check_export_path

            try:
                check_export_path(export_path, overwrite=True)
            except (ValueError, OSError) as err:
                raise UsageError(f"callback.export_path cannot be used: {err}") from None
    logger = cfg.get("logger")
    if logger is not None and str(logger.get("_target_", "")).endswith("TensorBoardLogger"):
        if not (_module_available("tensorboard") or _module_available("tensorboardX")):
            raise UsageError(
                "logger=tensorboard needs the `tensorboard` package, which is not installed: "
                "pip install 'nvfp4_qat[tensorboard]', or use `logger=csv` (the default) or `logger=null`."
            )


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
    from nvfp4_qat import _backend

    if not _backend.triton_available():
        raise UsageError(
            "calibrator=triton needs the `triton` package, which is not importable here "
            "(pip install triton on Linux with a CUDA GPU). Use `calibrator=reference` (the exact "
            "PyTorch sweep, same scales) or `calibrator=auto` (Triton when it can run)."
        )
    if not _backend.triton_usable(torch.device("cuda" if on_cuda else "cpu")):
        raise UsageError(
            "calibrator=triton runs the fused Triton sweep kernel, which needs the model on a "
            "CUDA GPU, and this run trains on the CPU. Use `calibrator=reference` or "
            "`calibrator=auto` (same scales), add `trainer=gpu` on a GPU machine, or set "
            "TRITON_INTERPRET=1 to run the kernel in Triton's (slow) CPU interpreter."
        )
