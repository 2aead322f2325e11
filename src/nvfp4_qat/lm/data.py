"""Text from local files as a LightningDataModule: byte-, character- or HF-tokenizer-level.

The default source is text every Python installation has offline: the standard library's own
``.py`` files, found at run time through ``sysconfig.get_paths()["stdlib"]``. Files are taken in
sorted order of their path until ``max_chars`` characters are collected, joined, and split into a
training part (the first ``1 - val_fraction``) and a validation part (the rest), so the same
machine always sees the same text. The numbers in a summary therefore depend on the Python
version (its stdlib), which the summary prints.
"""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from nvfp4_qat.lm.checks import UsageError

__all__ = ["TOKENIZERS", "TextDataModule", "TokenChunks", "collect_files", "stdlib_dir"]

TOKENIZERS = ("byte", "char", "hf")
# Virtual-env and vendored packages are not the standard library; skip them when scanning it.
_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(paths: list[str] | None, pattern: str, recursive: bool) -> list[Path]:
    """Resolve ``paths`` (files, directories or globs; ``None``: the stdlib) to a sorted file list.

    Directories contribute the files matching ``pattern`` (and, with ``recursive``, those in
    sub-directories). The result is sorted and de-duplicated, so it does not depend on the order
    the file system lists entries in.

    Raises:
        UsageError: a path that matches nothing, or no file at all.
    """
    roots = [str(stdlib_dir())] if paths is None else [str(p) for p in paths]
    found: set[Path] = set()
    for root in roots:
        path = Path(root).expanduser()
        if path.is_dir():
            matches = path.rglob(pattern) if recursive else path.glob(pattern)
            found.update(p for p in matches if p.is_file() and not _SKIP_PARTS & set(p.parts))
        elif path.is_file():
            found.add(path)
        else:
            anchor = Path(path.anchor or ".")
            matches = [p for p in anchor.glob(str(path.relative_to(anchor))) if p.is_file()]
            if not matches:
                raise UsageError(
                    f"data.paths entry {root!r} matches no file; give files, directories or globs "
                    f"of local text (e.g. data.paths=[notes/*.txt])."
                )
            found.update(matches)
    if not found:
        raise UsageError(
            f"no file matches data.pattern={pattern!r} in {roots}; change data.pattern or data.paths."
        )
    return sorted(found)


def read_text(files: list[Path], max_chars: int) -> tuple[str, int]:
    """Concatenate files (UTF-8, undecodable bytes replaced) until ``max_chars`` characters.

    Returns:
        The text and how many of ``files`` it took.
    """
    parts: list[str] = []
    total = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "\n".join(parts), len(parts)


class TokenChunks(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: item ``i`` is ``(x, y)``, ``y = x`` shifted.

    Args:
        tokens: 1-D integer tensor.
        seq_len: tokens per input sequence.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self.tokens.numel() - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]


class TextDataModule(pl.LightningDataModule):
    """Language-model data from local text files (default: the Python standard library's source).

    Args:
        paths: files, directories or globs; ``None`` reads the stdlib's ``.py`` files.
        pattern: file-name glob inside directories.
        recursive: also scan sub-directories.
        max_chars: characters to read (files in sorted order, the last one cut).
        val_fraction: share of the text, taken from its end, used for validation.
        tokenizer: ``"byte"`` (UTF-8 bytes, 256 ids), ``"char"`` (the ``vocab_size - 1`` most
            frequent characters of the training text, id 0 for all others) or ``"hf"`` (the
            Hugging Face tokenizer saved in ``tokenizer_path``, loaded offline).
        tokenizer_path: directory of the HF tokenizer (``tokenizer="hf"`` only).
        vocab_size: ids of the ``"char"`` tokenizer.
        seq_len: tokens per training sequence.
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seeds the shuffling of the training sequences.

    Raises:
        ValueError: a bad argument (named in the message).
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        pattern: str = "*.py",
        recursive: bool = False,
        max_chars: int = 600_000,
        val_fraction: float = 0.1,
        tokenizer: str = "byte",
        tokenizer_path: str | None = None,
        vocab_size: int = 256,
        seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
        if tokenizer == "hf" and not tokenizer_path:
            raise ValueError("tokenizer='hf' needs tokenizer_path, a local tokenizer directory")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value in (
            ("max_chars", max_chars),
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("vocab_size", vocab_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.paths = None if paths is None else list(paths)
        self.pattern, self.recursive, self.max_chars = pattern, recursive, max_chars
        self.val_fraction, self.tokenizer, self.tokenizer_path = val_fraction, tokenizer, tokenizer_path
        self.char_vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.files: list[Path] = []
        self.train_set: TokenChunks | None = None
        self.val_set: TokenChunks | None = None
        self.vocab_size: int | None = None  # known after setup()

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenize the text (once; later calls reuse it)."""
        if self.train_set is not None:
            return
        files = collect_files(self.paths, self.pattern, self.recursive)
        text, used = read_text(files, self.max_chars)
        self.files = files[:used]
        cut = int(len(text) * (1.0 - self.val_fraction))
        encode = self._encoder(text[:cut])
        train, val = encode(text[:cut]), encode(text[cut:])
        for name, tokens in (("training", train), ("validation", val)):
            if tokens.numel() <= self.seq_len * self.batch_size:
                raise UsageError(
                    f"the {name} text has {tokens.numel()} tokens, fewer than one batch "
                    f"(data.batch_size={self.batch_size} x data.seq_len={self.seq_len}); raise "
                    f"data.max_chars or data.val_fraction, or lower data.batch_size."
                )
        self.train_set, self.val_set = TokenChunks(train, self.seq_len), TokenChunks(val, self.seq_len)

    def _encoder(self, train_text: str):
        if self.tokenizer == "byte":
            self.vocab_size = 256
            return lambda s: torch.frombuffer(bytearray(s.encode("utf-8")), dtype=torch.uint8).clone()
        if self.tokenizer == "char":
            # Most frequent first, ties by code point: deterministic for a given text.
            ranked = sorted(Counter(train_text).items(), key=lambda kv: (-kv[1], kv[0]))
            ids = {ch: i + 1 for i, (ch, _) in enumerate(ranked[: self.char_vocab_size - 1])}
            self.vocab_size = self.char_vocab_size
            return lambda s: torch.tensor([ids.get(ch, 0) for ch in s], dtype=torch.int32)
        from transformers import AutoTokenizer

        if not Path(self.tokenizer_path).expanduser().is_dir():
            raise UsageError(
                f"data.tokenizer_path={self.tokenizer_path!r} is not a directory; tokenizer=hf loads a "
                f"tokenizer saved with `save_pretrained` (usually the model directory) and never downloads."
            )
        tok = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        self.vocab_size = len(tok)
        return lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"], dtype=torch.int32)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=gen,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    def describe(self) -> str:
        """One line for the summary: how much text, from where, how tokenized."""
        n_train = self.train_set.tokens.numel() if self.train_set is not None else 0
        n_val = self.val_set.tokens.numel() if self.val_set is not None else 0
        where = f"Python {sysconfig.get_python_version()} stdlib" if self.paths is None else "data.paths"
        return (
            f"{len(self.files)} files from {where}, {self.tokenizer} tokens: "
            f"{n_train:,} train / {n_val:,} val"
        )
