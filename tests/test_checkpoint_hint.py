"""Item 8 of issue 16: loading a QAT checkpoint into a model that was not quantized first."""

import lightning.pytorch as pl
import pytest
import torch

from nvfp4_qat import NVFP4Recalibration
from nvfp4_qat.checkpoint import MissingQuantizationError, explain_load_errors, missing_restore_message
from nvfp4_qat.lm import GPT, CausalLMModule
from nvfp4_qat.quantize import nvfp4_layers
from test_callback import TinyRegressor, loader, trainer


class PlainRegressor(TinyRegressor):
    """The same module without the on_load_checkpoint hook: what a user writes first."""

    def on_load_checkpoint(self, checkpoint):
        pass


def _qat_checkpoint(tmp_path, module) -> str:
    t = trainer(tmp_path, [NVFP4Recalibration(every_n_train_steps=2)], max_steps=2)
    t.fit(module, loader())
    path = str(tmp_path / "qat.ckpt")
    t.save_checkpoint(path)
    return path


def test_load_without_restore_names_the_fix(tmp_path):
    path = _qat_checkpoint(tmp_path, TinyRegressor())
    with pytest.raises(RuntimeError, match="Unexpected key"):  # Lightning's own message
        PlainRegressor.load_from_checkpoint(path)
    with pytest.raises(MissingQuantizationError) as info, explain_load_errors():
        PlainRegressor.load_from_checkpoint(path)
    message = str(info.value)
    assert "layers 'net.0', 'net.2' hold NVFP4 scales" in message
    assert "nvfp4_qat.restore_quantization(self, checkpoint)" in message
    assert "Unexpected key" in str(info.value.__cause__)
    # with the hook the same checkpoint loads
    restored = TinyRegressor.load_from_checkpoint(path)
    assert [n for n, _ in nvfp4_layers(restored)] == ["net.0", "net.2"]


def test_other_load_errors_pass_through_unchanged():
    assert missing_restore_message(["net.0.weight", "net.0.bias"]) is None
    with pytest.raises(RuntimeError, match="Missing key"), explain_load_errors():
        torch.nn.Linear(2, 2).load_state_dict({})


def test_causal_lm_module_restores_by_itself(tmp_path):
    pl.seed_everything(0)
    net = dict(vocab_size=256, d_model=32, n_layer=1, n_head=2, seq_len=16)
    module = CausalLMModule(GPT(**net))
    data = torch.randint(0, 256, (32, 17))
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), 8)
    t = trainer(tmp_path, [NVFP4Recalibration(every_n_train_steps=1)], max_steps=2)
    t.fit(module, batches)
    t.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = CausalLMModule.load_from_checkpoint(tmp_path / "lm.ckpt", net=GPT(**net))
    want = {n: m.block_amax for n, m in nvfp4_layers(module)}
    got = {n: m.block_amax for n, m in nvfp4_layers(loaded)}
    assert want.keys() == got.keys() and len(got) > 0
    assert all(torch.equal(want[n], got[n]) for n in want)
