"""The language-model side of the ``nvfp4-qat`` command: network, data, training module, job.

Importable on its own for use in plain Lightning code::

    from nvfp4_qat.lm import GPT, CausalLMModule, TextDataModule
"""

from nvfp4_qat.lm.checks import UsageError
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
