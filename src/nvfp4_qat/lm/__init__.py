"""The language-model side of the ``nvfp4-qat`` command: network, data, training module, job.

Importable on its own for use in plain Lightning code::

    from nvfp4_qat.lm import GPT, CausalLMModule, TextDataModule

The names load their module on first access (PEP 562 ``__getattr__``): ``nvfp4-qat --help`` and
the command's early checks (``nvfp4_qat.lm.checks``) do not wait for Lightning to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nvfp4_qat.lm.checks import UsageError

if TYPE_CHECKING:
    from nvfp4_qat.lm.data import TextDataModule, TokenChunks
    from nvfp4_qat.lm.model import GPT, load_hf_causal_lm
    from nvfp4_qat.lm.module import CausalLMModule, TokenThroughput, quantized_weight_mse

__all__ = [
    "GPT",
    "CausalLMModule",
    "TextDataModule",
    "TokenChunks",
    "TokenThroughput",
    "UsageError",
    "load_hf_causal_lm",
    "quantized_weight_mse",
]

_LAZY = {
    "GPT": "nvfp4_qat.lm.model",
    "load_hf_causal_lm": "nvfp4_qat.lm.model",
    "TextDataModule": "nvfp4_qat.lm.data",
    "TokenChunks": "nvfp4_qat.lm.data",
    "CausalLMModule": "nvfp4_qat.lm.module",
    "TokenThroughput": "nvfp4_qat.lm.module",
    "quantized_weight_mse": "nvfp4_qat.lm.module",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nvfp4_qat.lm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
