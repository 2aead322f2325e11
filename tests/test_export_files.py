"""Export safety (issue 13, items 1 and 8): which folders an export may replace, and crash recovery.

An export replaces its target folder as a whole, so ``overwrite=True`` must only ever replace a
previous export of this package, never a folder holding anything else, the current directory or a
parent of it. A killed export must leave the old checkpoint recoverable and its hidden temporaries
removable by the next export.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from nvfp4_qat import export_nvfp4, load_nvfp4
from nvfp4_qat._export_files import check_export_path, is_previous_export
from nvfp4_qat.config import QATConfig
from nvfp4_qat.quantize import quantize_model


def prepared(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    return quantize_model(model, QATConfig(init_calibration="max")).eval()


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("path", ["", ".", "..", "./", "  "], ids=repr)
def test_cwd_empty_and_parents_are_refused_without_touching_them(tmp_path, monkeypatch, path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine too")
    monkeypatch.chdir(run)
    with pytest.raises(ValueError, match="current directory|empty string"):
        export_nvfp4(prepared(), path, overwrite=True)
    assert listing(run) == ["README.md"] and listing(tmp_path) == ["notes.txt", "run"]


def test_a_parent_of_the_cwd_given_by_absolute_path_is_refused(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    with pytest.raises(ValueError, match="one of its parents"):
        export_nvfp4(prepared(), tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "b").is_dir()


def test_overwrite_refuses_a_folder_with_user_files(tmp_path):
    # The reproducer of issue 13: a run folder with a README, checkpoints and logs.
    target = tmp_path / "out"
    target.mkdir()
    for name in ("README.md", "last.ckpt", "metrics.csv"):
        (target / name).write_text(name)
    with pytest.raises(FileExistsError, match=r"not an NVFP4 export .*README.md, last.ckpt, metrics.csv"):
        export_nvfp4(prepared(), target, overwrite=True)
    assert listing(target) == ["README.md", "last.ckpt", "metrics.csv"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_overwrite_refuses_an_export_with_one_extra_file_or_folder(tmp_path):
    target = tmp_path / "out"
    export_nvfp4(prepared(), target)
    assert is_previous_export(target)
    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="tokenizer.json"):
        export_nvfp4(prepared(1), target, overwrite=True)
    (target / "tokenizer.json").unlink()
    (target / "sub").mkdir()
    assert not is_previous_export(target)
    (target / "sub").rmdir()
    export_nvfp4(prepared(1), target, overwrite=True)
    assert torch.equal(load_nvfp4(target)["0.bias"], prepared(1)[0].bias.detach())


def test_a_foreign_quant_config_is_not_ours(tmp_path):
    target = tmp_path / "out"
    export_nvfp4(prepared(), target)
    (target / "hf_quant_config.json").write_text('{"producer": {"name": "modelopt"}}')
    with pytest.raises(FileExistsError, match="not an NVFP4 export"):
        export_nvfp4(prepared(), target, overwrite=True)


def test_unusable_paths_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_export_path(tmp_path / "file", overwrite=True)
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'} is a file"):
        check_export_path(tmp_path / "file" / "sub" / "out", overwrite=True)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        check_export_path(3, overwrite=True)
    assert check_export_path(tmp_path / "new" / "out", overwrite=False) == tmp_path / "new" / "out"


# --- interrupted exports (item 8) -----------------------------------------------------------------


def dead_pid() -> int:
    # A pid that surely belongs to no running process: a child that has exited and been reaped.
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def tag(pid: int) -> str:
    from nvfp4_qat._export_files import _owner_tag

    return f"{pid}@{_owner_tag().partition('@')[2]}"


def test_stale_temporaries_of_dead_exports_are_removed(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".out.tmp-{tag(pid)}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".out.tmp-{tag(os.getppid())}-def456"  # a live process: maybe exporting now
    alive.mkdir()
    other = tmp_path / ".other.tmp-1@elsewhere-xyz"  # another target: not ours to clean
    other.mkdir()
    export_nvfp4(prepared(), tmp_path / "out")
    assert listing(tmp_path) == sorted([alive.name, other.name, "out"])


def test_a_kill_between_the_renames_is_recovered(tmp_path):
    # What a SIGKILL after "rename target -> holder/old" and before "rename tmp -> target" leaves.
    target = tmp_path / "out"
    export_nvfp4(prepared(), target)
    expected = load_nvfp4(target)
    holder = tmp_path / f".out.old-{tag(dead_pid())}-k1ll3d"
    holder.mkdir()
    os.rename(target, holder / "old")
    half = tmp_path / f".out.tmp-{tag(dead_pid())}-h4lf"
    half.mkdir()
    loaded = load_nvfp4(target)  # load finds the old copy and puts it back
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert target.is_dir() and not holder.exists()
    # The same state seen by the next export: restored, then replaced with overwrite.
    holder.mkdir()
    os.rename(target, holder / "old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_nvfp4(prepared(1), target)  # the restored export is not silently replaced
    assert is_previous_export(target)
    export_nvfp4(prepared(1), target, overwrite=True)
    assert listing(tmp_path) == ["out"]


# --- the callback checks its export path before training -------------------------------------------


def fit_with_export(tmp_path, export_path, **trainer_kw):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from nvfp4_qat import NVFP4Recalibration

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 32))
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return nn.functional.mse_loss(self.net(batch[0]), batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Regressor()
    kw = dict(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    kw.update(trainer_kw)
    callbacks = kw.pop("callbacks", [])
    trainer = pl.Trainer(callbacks=[NVFP4Recalibration(export_path=export_path), *callbacks], **kw)
    data = DataLoader(TensorDataset(torch.randn(8, 32)), batch_size=4)
    trainer.fit(module, data)
    return module


def test_callback_refuses_a_folder_with_user_files_before_training(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "README.md").write_text("keep")
    with pytest.raises(
        ValueError, match=r"`export_path` .* cannot be used: .*not an NVFP4 export .*README.md"
    ):
        fit_with_export(tmp_path, str(target))
    assert listing(target) == ["README.md"]


def test_callback_refuses_the_cwd_and_the_run_folders(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current directory"):
        fit_with_export(tmp_path, ".")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "out" / "ckpts")
    with pytest.raises(ValueError, match="would replace the run's ModelCheckpoint dirpath"):
        fit_with_export(tmp_path, "out", callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(ValueError, match="would replace the run's default_root_dir"):
        fit_with_export(tmp_path / "out" / "run", "out")


def test_callback_exports_into_a_new_folder_and_replaces_its_own_export(tmp_path):
    target = tmp_path / "out"
    fit_with_export(tmp_path / "run", str(target))
    assert is_previous_export(target)
    module = fit_with_export(tmp_path / "run", str(target))  # a second run replaces it
    assert module.steps == 2
    assert torch.equal(load_nvfp4(target)["net.0.bias"], module.net[0].bias.detach())
