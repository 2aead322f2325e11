"""``QATConfig``: what :func:`~nvfp4_qat.quantize_model` converts and how the QAT layers behave.

One frozen dataclass, validated in ``__post_init__`` so that a bad value is refused where the user
wrote it (``QATConfig(gradient="stE")``), with a message that names the field and the allowed
values. Lists are accepted for the pattern fields (YAML and Hydra give lists) and stored as tuples,
so a config is hashable and compares by value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nvfp4_qat._validation import BACKENDS, METHODS
from nvfp4_qat.format import BLOCK_SIZE

__all__ = ["GRADIENTS", "INIT_CALIBRATIONS", "QATConfig"]

#: Straight-through-estimator variants (see :mod:`nvfp4_qat.modules`).
GRADIENTS = ("ste", "clipped_ste")
#: How ``block_amax`` is set when a layer is converted.
INIT_CALIBRATIONS = ("max", "mse")


def _patterns(value: object, field: str) -> tuple[str, ...]:
    # A bare string is the classic mistake (include="lm_head" would iterate characters).
    if isinstance(value, str) or not (isinstance(value, (tuple, list)) or _is_sequence(value)):
        raise TypeError(
            f"QATConfig.{field} must be a tuple or list of glob strings, e.g. ('lm_head',), "
            f"got {type(value).__name__} {value!r}"
        )
    items = tuple(value)  # type: ignore[arg-type]
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"QATConfig.{field} must hold non-empty strings, got {item!r}")
    return items


def _is_sequence(value: object) -> bool:
    # OmegaConf's ListConfig is neither a list nor a tuple but iterates like one.
    return hasattr(value, "__iter__") and hasattr(value, "__len__") and not isinstance(value, Mapping)


def _choice(value: object, allowed: tuple[str, ...], field: str) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"QATConfig.{field} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class QATConfig:
    """Settings of NVFP4 quantization-aware training.

    Attributes:
        include: ``fnmatch`` globs on module names (``model.named_modules()``); an ``nn.Linear``
            is converted when its name matches one of them ...
        exclude: ... and none of these (recipes exclude output heads, e.g. ``("lm_head",)``).
        block_size: elements per block along the input dim; NVFP4 fixes it at 16.
        gradient: ``"ste"`` (the gradient passes unchanged) or ``"clipped_ste"`` (zero gradient
            where ``|w| > 6 * block_scale``, the elements that saturation clips).
        quantize_activations: also fake-quantize the layer inputs (W4A4) with dynamic per-block
            scales; off by default (weight-only W4A16 QAT).
        init_calibration: how scales are set at conversion: ``"max"`` (block amax = max ``|w|``)
            or ``"mse"`` (the exact MSE sweep over all 126 FP8 codes).
        backend: sweep backend for the initial calibration (``"auto"``, ``"triton"``,
            ``"reference"``).
        method: sweep method (``"pruned"`` or ``"exhaustive"``; same result, different speed).
        fake_quant_backend: the forward's fake-quant, same vocabulary as ``backend``: ``"auto"``
            (the fused Triton kernel where Triton runs: on CUDA, and on the CPU when ``TRITON_INTERPRET=1``
            asks for Triton's slow interpreter; else PyTorch), ``"triton"``
            or ``"reference"`` (PyTorch). Every choice gives the same bits; it decides speed, and
            whether :func:`~nvfp4_qat.recalibrate` can take its fused GPU path (the report's
            ``execution`` says which ran).

    Raises:
        TypeError, ValueError: a field of the wrong type or value (the message names the field).
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    block_size: int = BLOCK_SIZE
    gradient: str = "ste"
    quantize_activations: bool = False
    init_calibration: str = "mse"
    backend: str = "auto"
    method: str = "pruned"
    fake_quant_backend: str = "auto"

    def __post_init__(self) -> None:
        # frozen=True: normalised values are written through object.__setattr__.
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if not self.include:
            raise ValueError("QATConfig.include must hold at least one pattern, e.g. ('*',)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"QATConfig.block_size must be the int 16, got {self.block_size!r}")
        if self.block_size != BLOCK_SIZE:
            raise ValueError(f"QATConfig.block_size must be 16 (the NVFP4 block), got {self.block_size}")
        _choice(self.gradient, GRADIENTS, "gradient")
        if not isinstance(self.quantize_activations, bool):
            raise TypeError(
                f"QATConfig.quantize_activations must be a bool, got {self.quantize_activations!r}"
            )
        _choice(self.init_calibration, INIT_CALIBRATIONS, "init_calibration")
        _choice(self.backend, BACKENDS, "backend")
        _choice(self.method, METHODS, "method")
        if self.fake_quant_backend == "torch":  # the name before the vocabulary was shared
            raise ValueError(
                "QATConfig.fake_quant_backend='torch' is now called 'reference' (the sweep's name "
                f"for the PyTorch implementation); must be one of {BACKENDS}"
            )
        _choice(self.fake_quant_backend, BACKENDS, "fake_quant_backend")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QATConfig:
        """Build a config from a mapping (e.g. a Hydra/YAML node), refusing unknown keys.

        Raises:
            TypeError: ``values`` is not a mapping.
            ValueError: an unknown key (the message lists the known fields), or a bad value.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"QATConfig.from_dict expects a mapping, got {type(values).__name__}")
        return cls().replace(**dict(values))

    def replace(self, **overrides: Any) -> QATConfig:
        """A copy with ``overrides`` applied (validated again); unknown names raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown QATConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists for the patterns), e.g. for hyper-parameter logging."""
        out = dataclasses.asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out
