"""A tiny randomly initialised Hugging Face causal LM with its own tokenizer, built offline.

Used by the config and command tests in place of a real checkpoint: a byte-level BPE tokenizer
trained in milliseconds on a few lines of code, and a 2-layer Llama whose vocabulary matches it,
both written with ``save_pretrained`` into one directory, as a user's model directory would be.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TEXT = [
    "def f(x):\n    return x + 1\n" * 40,
    "class A:\n    '''Doc.'''\n    pass\n" * 20,
    "import os\nprint(os.path.join('a', 'b'))\n" * 20,
]


def save_tiny_llama(directory: Path) -> Path:
    """Write tokenizer + model into ``directory`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
