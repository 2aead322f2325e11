"""Loading a QAT checkpoint into a fresh model: what goes wrong, and what to call instead.

A checkpoint written during NVFP4 QAT holds each quantized layer's scale buffers
(``<layer>.block_amax``, ``<layer>.global_amax``, ``<layer>.input_amax``). A freshly built model has
plain ``nn.Linear`` layers there, so ``LightningModule.load_from_checkpoint`` (which runs no
callback) fails with ``Unexpected key(s) in state_dict: ...block_amax...``: the model must be
quantized first, by :func:`nvfp4_qat.restore_quantization` from the module's
``on_load_checkpoint``. Nothing of this package runs inside that failing call for a module it
does not own, so the message cannot be changed there; :func:`explain_load_errors` rewrites it for
code that loads inside it, and :func:`missing_restore_message` says the same for any key list.
(``nvfp4_qat.lm.CausalLMModule`` restores by itself.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["MissingQuantizationError", "explain_load_errors", "missing_restore_message", "nvfp4_keys"]

#: The buffers an ``NVFP4Linear`` adds to a state dict.
SCALE_BUFFERS = ("block_amax", "global_amax", "input_amax")
_KEY = re.compile(r"[\w.]+\.(?:" + "|".join(SCALE_BUFFERS) + r")\b")


class MissingQuantizationError(RuntimeError):
    """A QAT checkpoint was loaded into a model that was not quantized first."""


def nvfp4_keys(keys: Iterable[str]) -> list[str]:
    """The NVFP4 scale-buffer keys among ``keys`` (state-dict keys)."""
    return [k for k in keys if k.rsplit(".", 1)[-1] in SCALE_BUFFERS]


def missing_restore_message(keys: Iterable[str]) -> str | None:
    """What to do when ``keys`` were unexpected in a ``load_state_dict``; ``None`` if none is NVFP4's."""
    found = nvfp4_keys(keys)
    if not found:
        return None
    layers = sorted({k.rsplit(".", 1)[0] for k in found})
    shown = ", ".join(repr(n) for n in layers[:4]) + (
        f" (+{len(layers) - 4} more)" if len(layers) > 4 else ""
    )
    return (
        f"this checkpoint was written during NVFP4 QAT: layers {shown} hold NVFP4 scales "
        f"({found[0]!r}, ...), but the model they are loaded into has plain nn.Linear layers there. "
        f"Quantize it first: in your LightningModule add\n"
        f"    def on_load_checkpoint(self, checkpoint):\n"
        f"        nvfp4_qat.restore_quantization(self, checkpoint)\n"
        f"(or call nvfp4_qat.quantize_model(model, config) with the training's QATConfig before "
        f"model.load_state_dict(...))."
    )


@contextmanager
def explain_load_errors() -> Iterator[None]:
    """Turn a ``load_state_dict`` failure over NVFP4 scale keys into :class:`MissingQuantizationError`.

    Example::

        with explain_load_errors():
            model = MyModule.load_from_checkpoint(path)
    """
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "Unexpected key(s) in state_dict" not in text:
            raise
        message = missing_restore_message(_KEY.findall(text))
        if message is None:
            raise
        raise MissingQuantizationError(message) from err
