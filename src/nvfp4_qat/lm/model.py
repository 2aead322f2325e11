"""The networks the command trains: a small decoder-only GPT, or a local Hugging Face causal LM.

Both map ``input_ids`` ``(batch, seq)`` int64 to logits ``(batch, seq, vocab)``; the HF model
returns an output object with ``.logits``, which :class:`~nvfp4_qat.lm.CausalLMModule` unwraps.
Every ``nn.Linear`` of :class:`GPT` has in-features divisible by 16, so all of them can become
NVFP4 layers (recipes keep the output head ``lm_head`` in high precision).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4_qat.lm.checks import UsageError

__all__ = ["GPT", "load_hf_causal_lm"]


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln_1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc_out = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=-1)
        # (b, n_head, t, head_dim) for scaled_dot_product_attention
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """A small GPT-2-style language model (learned positions, pre-norm blocks, untied head).

    Args:
        vocab_size: number of token ids (256 for byte-level text).
        seq_len: longest input the position table covers.
        d_model: width; a multiple of 16 (the NVFP4 block) and of ``n_head``.
        n_layer: number of transformer blocks.
        n_head: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        dropout: dropout in attention and on the embeddings (0 for the short CPU recipes).

    Raises:
        ValueError: a size that is not positive, or ``d_model`` not divisible by 16 and ``n_head``.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 128,
        d_model: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("d_model", d_model),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("mlp_ratio", mlp_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT {name} must be a positive int, got {value!r}")
        if d_model % 16 or d_model % n_head:
            raise ValueError(
                f"GPT d_model must be divisible by 16 (the NVFP4 block) and by n_head={n_head}, got {d_model}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPT dropout must be in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_head, mlp_ratio, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                continue
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, seq, vocab_size)`` for ``input_ids`` ``(batch, seq)``, ``seq <= seq_len``."""
        t = input_ids.shape[1]
        if t > self.seq_len:
            raise ValueError(f"input has {t} tokens, longer than GPT seq_len={self.seq_len}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def load_hf_causal_lm(path: str, dtype: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a Hugging Face causal LM from a local directory; never downloads.

    Args:
        path: directory holding ``config.json`` and the weights (``save_pretrained`` output).
        dtype: torch dtype name to load the weights in (``"bfloat16"``, ...); ``None`` leaves the
            choice to ``from_pretrained`` (whose default differs between transformers versions).
        trust_remote_code: passed to ``from_pretrained`` (only for models that need custom code).

    Returns:
        The ``AutoModelForCausalLM`` model, in train mode.

    Raises:
        ImportError: ``transformers`` is not installed (``pip install 'nvfp4_qat[hf]'``).
        UsageError: ``path`` is not a directory with a ``config.json``, or ``dtype`` is unknown.
    """
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ImportError("model=hf needs the `transformers` package: pip install 'nvfp4_qat[hf]'") from err
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        what = "does not exist" if not directory.exists() else "has no config.json"
        raise UsageError(
            f"model.net.path={path!r} {what}. The Hugging Face recipe loads a model from a local "
            f"directory and never downloads: point model.net.path at a directory written by "
            f"`save_pretrained` (config.json plus *.safetensors), e.g. "
            f"`nvfp4-qat recipe=hf_causal_lm model.net.path=/models/my-llama`."
        )
    kwargs: dict = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise UsageError(f"model.net.dtype must be a torch dtype name such as 'bfloat16', got {dtype!r}")
        # transformers renamed `torch_dtype` to `dtype` in 4.56; older versions know only the former.
        kwargs["dtype" if _transformers_version() >= (4, 56) else "torch_dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    return model.train()


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
