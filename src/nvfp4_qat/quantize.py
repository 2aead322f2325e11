"""``quantize_model``: swap the selected ``nn.Linear`` modules of any model for ``NVFP4Linear``.

Selection is by ``fnmatch`` globs on the names of ``model.named_modules()`` (``QATConfig.include``
and ``exclude``). Only modules whose type is exactly ``nn.Linear`` are swapped: a subclass may
carry its own forward or be used through its ``.weight`` by its parent (``nn.MultiheadAttention``
reads ``out_proj.weight`` directly), where a swap would silently quantize nothing. Selected layers
that cannot be converted (``in_features`` not divisible by 16, or a subclass) are left as they are
and listed in one warning.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import torch
from torch import nn

from nvfp4_qat.config import QATConfig
from nvfp4_qat.modules import NVFP4Linear

__all__ = ["calibration_is_current", "quantize_model", "nvfp4_layers"]


def nvfp4_layers(model: nn.Module) -> list[tuple[str, NVFP4Linear]]:
    """``(name, module)`` of every ``NVFP4Linear`` in ``model``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NVFP4Linear)]


def _calibration_key(layer: NVFP4Linear) -> tuple:
    # The tensors themselves (so their storage cannot be reused meanwhile), where their data lives,
    # and their version counters, which every in-place write bumps (an optimizer step, copy_,
    # load_state_dict, a recalibration); a move or a cast changes the data pointer or the dtype.
    w, b, g = layer.weight, layer.block_amax, layer.global_amax
    return (w, w.dtype, w.data_ptr(), w._version, b, b.data_ptr(), b._version, g, g._version)


def _mark_calibrated(layer: NVFP4Linear) -> None:
    layer._nvfp4_mse_calibrated = _calibration_key(layer)


def calibration_is_current(model: nn.Module) -> bool:
    """Whether every ``NVFP4Linear`` of ``model`` holds the MSE sweep's scales for its current weight.

    True right after :func:`quantize_model` with ``init_calibration="mse"`` as long as no weight or
    scale was written since (in place or replaced) and nothing was moved or cast: calibrating again
    would change nothing (the sweep's result is bit-identical for every backend and method).
    """
    layers = nvfp4_layers(model)
    if not layers:
        return False
    for _, layer in layers:
        key = getattr(layer, "_nvfp4_mse_calibrated", None)
        if key is None or not _same_key(key, _calibration_key(layer)):
            return False
    return True


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        (x is y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True)
    )


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(config: QATConfig, linear_names: list[str]) -> None:
    # An include pattern that selects nothing is almost always a typo; say so instead of quantizing
    # nothing. An exclude pattern that matches nothing is allowed (the quickstart's "*lm_head" on a
    # model without an output head) with a warning, since it may be a typo ("lm_haed").
    if not linear_names:
        raise ValueError(
            "the model has no nn.Linear module, so there is nothing to quantize (quantize_model "
            "converts nn.Linear layers to NVFP4Linear)"
        )
    for pattern in config.include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linear_names):
            shown = ", ".join(repr(n) for n in linear_names[:6])
            more = f" (+{len(linear_names) - 6} more)" if len(linear_names) > 6 else ""
            raise ValueError(
                f"QATConfig.include pattern {pattern!r} matches no nn.Linear module name; "
                f"the model's linear modules are: {shown}{more}"
            )
    for pattern in config.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linear_names):
            warnings.warn(
                f"QATConfig.exclude pattern {pattern!r} matches no nn.Linear module name, so it "
                f"excludes nothing (fine if the model has no such layer; check the spelling if it has)",
                stacklevel=3,
            )


def _check_finite(name: str, weight: torch.Tensor) -> None:
    if weight.device.type == "meta":
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        nan = int(torch.isnan(weight).sum())
        inf = weight.numel() - int(finite.sum()) - nan
        raise ValueError(
            f"layer {name!r}: its weight ({name}.weight, shape {tuple(weight.shape)}) holds {nan} NaN "
            f"and {inf} infinite value(s); NVFP4 scales need finite weights (check the checkpoint "
            f"or the training that produced them)"
        )


def quantize_model(model: nn.Module, config: QATConfig | None = None, **overrides: Any) -> nn.Module:
    """Replace the selected ``nn.Linear`` modules of ``model`` by ``NVFP4Linear``, in place.

    Each new layer reuses the original weight and bias ``Parameter`` objects and calibrates its
    scales with ``config.init_calibration`` (not on the ``meta`` device: run
    :func:`~nvfp4_qat.recalibrate` after materialising such a model). A module registered under
    several names (shared or tied) is converted once and replaced under every name.

    Args:
        model: any ``nn.Module`` tree (e.g. a Hugging Face transformer); not itself an ``nn.Linear``.
        config: the QAT settings; default ``QATConfig()``.
        **overrides: fields to change on ``config``, e.g. ``exclude=("lm_head",)``.

    Returns:
        ``model`` itself, modified in place.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``config`` not a ``QATConfig``, or a field
            has the wrong type.
        ValueError: the model already holds ``NVFP4Linear`` layers ("already quantized") or none
            of type ``nn.Linear``, a bad field value or unknown field, an include pattern that
            matches no linear module (an exclude pattern that matches none is fine), ``model`` is
            itself an ``nn.Linear``, or a layer has non-finite weights (the name is given).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QATConfig()
    elif not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig or None, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    if isinstance(model, nn.Linear):
        raise ValueError(
            "model is itself an nn.Linear and cannot be swapped in place; use NVFP4Linear.from_linear"
        )
    already = nvfp4_layers(model)
    if already:
        raise ValueError(
            f"model is already quantized: it holds {len(already)} NVFP4Linear layer(s), e.g. "
            f"{already[0][0]!r}; quantize_model must run once (use recalibrate() to refresh scales)"
        )

    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    _check_patterns(config, linear_names)

    converted: dict[int, nn.Module] = {}  # id(old linear) -> its replacement
    places: list[tuple[str, int]] = []  # (name, id(old linear)) to swap once all are built
    skipped: dict[int, str] = {}
    # remove_duplicate=False: a shared module appears under each of its names.
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or not name or id(module) in skipped:
            continue
        if not _matches(name, config.include) or _matches(name, config.exclude):
            continue
        if id(module) not in converted:
            if type(module) is not nn.Linear:
                skipped[id(module)] = f"{name} ({type(module).__name__} is a subclass of nn.Linear)"
                continue
            if module.in_features % config.block_size != 0:
                why = f"in_features={module.in_features} not divisible by {config.block_size}"
                skipped[id(module)] = f"{name} ({why})"
                continue
            _check_finite(name, module.weight.detach())
            try:
                converted[id(module)] = NVFP4Linear.from_linear(module, config)
            except ValueError as err:
                raise ValueError(f"cannot quantize layer {name!r}: {err}") from err
        places.append((name, id(module)))
    # Swap only after every layer was built, so that an error leaves the model untouched.
    for name, key in places:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, converted[key])
    if config.init_calibration == "mse":
        for layer in converted.values():
            if layer.weight.device.type != "meta":  # not calibrated there
                _mark_calibrated(layer)

    if skipped:
        warnings.warn(
            f"quantize_model left {len(skipped)} selected linear layer(s) unquantized: "
            + "; ".join(skipped.values()),
            stacklevel=2,
        )
    return model
