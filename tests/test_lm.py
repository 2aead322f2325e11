"""Unit tests of the command's language-model pieces: data, network, LightningModule, checks."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from nvfp4_qat.lm import GPT, CausalLMModule, TextDataModule, TokenChunks, TokenThroughput, UsageError
from nvfp4_qat.lm.checks import check_group_choices, group_options, preflight
from nvfp4_qat.lm.data import collect_files, stdlib_dir
from nvfp4_qat.lm.model import load_hf_causal_lm
from nvfp4_qat.lm.module import quantized_weight_mse


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- data ---------------------------------------------------------------------------------------


def test_stdlib_files_are_found_sorted_and_exclude_site_packages():
    files = collect_files(None, "*.py", recursive=False)
    assert files == sorted(files) and len(files) > 50
    assert all(f.parent == stdlib_dir() and f.suffix == ".py" for f in files)
    assert stdlib_dir() / "os.py" in files


def test_text_split_and_byte_tokens_are_exact(tmp_path):
    _write(tmp_path, "b.txt", "héllo wörld\n" * 300)
    _write(tmp_path, "a.txt", "abc\n" * 700)
    dm = TextDataModule(
        paths=[str(tmp_path)], pattern="*.txt", max_chars=5000, val_fraction=0.2, seq_len=16, batch_size=4
    )
    dm.setup()
    # a.txt first (sorted), then b.txt cut at 5000 characters in all; files joined by a newline
    text = "abc\n" * 700 + "\n" + ("héllo wörld\n" * 300)[: 5000 - 2800]
    cut = int(len(text) * 0.8)
    assert [f.name for f in dm.files] == ["a.txt", "b.txt"]
    assert dm.vocab_size == 256
    assert dm.train_set.tokens.tolist() == list(text[:cut].encode())
    assert dm.val_set.tokens.tolist() == list(text[cut:].encode())


def test_token_chunks_shift_by_one():
    chunks = TokenChunks(torch.arange(50, dtype=torch.int32), seq_len=8)
    assert len(chunks) == 6  # (50 - 1) // 8
    x, y = chunks[5]
    assert torch.equal(x, torch.arange(40, 48)) and torch.equal(y, torch.arange(41, 49))
    assert x.dtype == torch.long


def test_char_tokenizer_ranks_by_frequency(tmp_path):
    _write(tmp_path, "t.txt", "aaab" * 200 + "c" * 100 + "é")
    dm = TextDataModule(
        paths=[str(tmp_path / "t.txt")],
        tokenizer="char",
        vocab_size=3,
        val_fraction=0.1,
        seq_len=4,
        batch_size=2,
    )
    dm.setup()
    # 'a' (600) gets id 1, 'b' (200) id 2; everything else shares id 0.
    assert dm.train_set.tokens[:8].tolist() == [1, 1, 1, 2, 1, 1, 1, 2]
    assert set(dm.val_set.tokens.tolist()) == {0}


def test_training_order_is_seeded(tmp_path):
    _write(tmp_path, "t.txt", "".join(chr(97 + i % 26) for i in range(20000)))

    def first_batch(seed):
        dm = TextDataModule(paths=[str(tmp_path)], pattern="*.txt", seq_len=8, batch_size=4, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_data_errors_name_the_setting(tmp_path):
    with pytest.raises(UsageError, match="data.paths entry"):
        collect_files([str(tmp_path / "nope*.txt")], "*.txt", False)
    _write(tmp_path, "small.txt", "x" * 100)
    dm = TextDataModule(paths=[str(tmp_path)], pattern="*.txt", seq_len=16, batch_size=8)
    with pytest.raises(UsageError, match="fewer than one batch"):
        dm.setup()
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        TextDataModule(tokenizer="words")
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=1.0)


# ---- networks -----------------------------------------------------------------------------------


def test_gpt_is_causal_and_every_linear_is_quantizable():
    torch.manual_seed(0)
    net = GPT(vocab_size=64, seq_len=16, d_model=32, n_layer=2, n_head=2)
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 64
    with torch.no_grad():
        a, b = net(x), net(y)
    assert a.shape == (2, 16, 64)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])
    assert all(m.in_features % 16 == 0 for m in net.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="d_model must be divisible by 16"):
        GPT(d_model=40, n_head=4)
    with pytest.raises(ValueError, match="longer than GPT seq_len"):
        net(torch.zeros(1, 17, dtype=torch.long))


def test_missing_model_directory_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist.*never downloads"):
        load_hf_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="has no config.json"):
        load_hf_causal_lm(str(tmp_path))


# ---- LightningModule ----------------------------------------------------------------------------


def _tiny_module_and_data(tmp_path):
    _write(tmp_path, "t.txt", "def f(x):\n    return x * 2\n" * 200)
    dm = TextDataModule(paths=[str(tmp_path)], pattern="*.txt", seq_len=16, batch_size=4, val_fraction=0.2)
    torch.manual_seed(0)
    module = CausalLMModule(GPT(seq_len=16, d_model=32, n_layer=1, n_head=2), lr=1e-2, warmup_steps=2)
    return module, dm


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_validation_loss_is_the_token_weighted_mean(tmp_path):
    module, dm = _tiny_module_and_data(tmp_path)
    _trainer().validate(module, datamodule=dm, verbose=False)
    with torch.no_grad():
        losses = [
            F.cross_entropy(module(x).flatten(0, 1), y.flatten(), reduction="sum")
            for x, y in dm.val_dataloader()
        ]
        tokens = len(dm.val_set) * 16
    assert module.last_val_loss == pytest.approx(float(sum(losses)) / tokens, rel=1e-6)
    assert module.history == []  # only fits record history


def test_fit_records_history_and_throughput(tmp_path):
    module, dm = _tiny_module_and_data(tmp_path)
    meter = TokenThroughput()
    _trainer(
        max_steps=6,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[meter],
    ).fit(module, datamodule=dm)
    assert [h["step"] for h in module.history] == [3, 6]
    assert all(h["weight_mse"] is None for h in module.history)  # no NVFP4 layer yet
    assert meter.tokens == 6 * 4 * 16 and meter.tokens_per_second > 0


def test_quantized_weight_mse_matches_the_layers(tmp_path):
    from nvfp4_qat import fake_quantize_nvfp4, quantize_model
    from nvfp4_qat.modules import NVFP4Linear

    module, _ = _tiny_module_and_data(tmp_path)
    assert quantized_weight_mse(module) is None
    quantize_model(module, exclude=("*lm_head",), init_calibration="max")
    layers = [m for m in module.modules() if isinstance(m, NVFP4Linear)]
    assert len(layers) == 4
    sse = sum(
        float(
            (fake_quantize_nvfp4(m.weight.detach(), m.block_amax, m.global_amax) - m.weight.detach())
            .pow(2)
            .sum()
        )
        for m in layers
    )
    assert quantized_weight_mse(module) == pytest.approx(
        sse / sum(m.weight.numel() for m in layers), rel=1e-5
    )


# ---- checks -------------------------------------------------------------------------------------


def test_unknown_group_option_is_refused_with_the_list():
    with pytest.raises(UsageError, match=r"unknown calibrator 'tritn'.*Available: auto, reference, triton"):
        check_group_choices(["calibrator=tritn"])
    with pytest.raises(UsageError, match="unknown recipe 'nope'"):
        check_group_choices(["-m", "recipe=default,nope"])
    check_group_choices(["calibrator=triton", "recipe=null", "callback.every_n_train_steps=1,2"])
    check_group_choices(["calibrator=mine", "hydra.searchpath=[file:///x]"])  # may be the user's
    assert set(group_options("recipe")) >= {"default", "comparison", "hf_causal_lm", "gpu"}


def _cfg(**overrides):
    base = {
        "trainer": {"accelerator": "cpu"},
        "calibrator": {"backend": "auto"},
        "model": {"net": {"_target_": "nvfp4_qat.lm.GPT"}},
        "data": {"tokenizer": "byte"},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        base[section][name] = value
    return OmegaConf.create(base)


def test_preflight_messages(monkeypatch):
    preflight(_cfg())
    with pytest.raises(UsageError, match=r"required value\(s\) not set: model.net.path"):
        preflight(_cfg(model__net={"path": "???"}))
    with pytest.raises(UsageError, match="stages.fp.steps"):
        preflight(_cfg(trainer__max_steps=5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="needs a CUDA GPU.*trainer=cpu"):
        preflight(_cfg(trainer__accelerator="gpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="calibrator=triton runs the fused Triton sweep kernel"):
        preflight(_cfg(calibrator__backend="triton"))
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    preflight(_cfg(calibrator__backend="triton"))
    monkeypatch.setattr("nvfp4_qat._backend.triton_available", lambda: False)
    with pytest.raises(UsageError, match="needs the `triton` package"):
        preflight(_cfg(calibrator__backend="triton"))
