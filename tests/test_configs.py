"""Every config option and every recipe composes (Hydra's compose API) and instantiates.

Also checks the house rules of the configs (a comment on every key, a ``_target_`` in every
option, recipes listed in recipes/README.md) and that the configs ship inside the package: a
user's own Hydra app finds them through ``pkg://nvfp4_qat.conf``, and a wheel built from the
repository contains them (slow test: a real non-editable install into a temporary directory).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import OmegaConf

from nvfp4_qat.lm.checks import CONFIG_GROUPS, group_options
from tiny_hf import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
GROUP_OPTIONS = [(g, o) for g in CONFIG_GROUPS if g != "recipe" for o in group_options(g)]
RECIPES = group_options("recipe")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def make_cfg(tmp_path, hf_dir):
    """Compose the primary config with overrides; required values a test run needs are filled in."""

    def compose_with(overrides: list[str]):
        with initialize_config_module("nvfp4_qat.conf", version_base="1.3"):
            return compose("nvfp4_qat", overrides=overrides)

    def make(*overrides: str):
        cfg = compose_with([*overrides, f"paths.output_dir={tmp_path}"])
        extra = []
        if str(cfg.model.net._target_).endswith("load_hf_causal_lm"):  # model=hf: the tiny local model
            extra.append(f"model.net.path={hf_dir}")
        if OmegaConf.is_missing(cfg.data, "paths"):  # data=text_files: a local text file
            (tmp_path / "notes.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 3000)
            extra.append(f"data.paths=[{tmp_path}]")
        return compose_with([*overrides, f"paths.output_dir={tmp_path}", *extra])

    return make


def _cpu_trainer(cfg) -> Trainer:
    # gpu/ddp options: every other argument is checked by building the Trainer on the CPU.
    overrides = {} if cfg.trainer.accelerator == "cpu" else {"accelerator": "cpu", "devices": 1}
    return instantiate(cfg.trainer, max_steps=2, **overrides)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_instantiates(make_cfg, group, option):
    from nvfp4_qat import NVFP4Recalibration, QATConfig
    from nvfp4_qat.lm import CausalLMModule, TextDataModule

    cfg = make_cfg(f"{group}={option}", "data.max_chars=60000")
    node = cfg[group]
    if group == "calibrator":  # plain settings, read by the callback (`${calibrator.backend}`)
        assert "_target_" not in node and set(node) == {"backend", "method"}
        assert node.backend == option and cfg.callback.backend == option
        assert node.method in ("pruned", "exhaustive")
        return
    assert "_target_" in node, f"{group}/{option}.yaml has no _target_"
    if group == "trainer":
        trainer = _cpu_trainer(cfg)
        assert isinstance(trainer, Trainer) and trainer.max_steps == 2
        assert cfg.trainer.accelerator == {"cpu": "cpu", "default": "cpu"}.get(option, "gpu")
        return
    obj = instantiate(node)
    if group == "quant":
        assert isinstance(obj, QATConfig)
        assert obj.quantize_activations is (option == "w4a4")
        assert obj.exclude == (() if option == "all_layers" else ("*lm_head",))
    elif group == "callback":
        assert isinstance(obj, NVFP4Recalibration)
        assert obj.every_n_train_steps == (0 if option == "frozen" else 50)
        assert isinstance(obj.quant_config, QATConfig)  # `${quant}` instantiated on the way
    elif group == "model":
        assert isinstance(obj, CausalLMModule)
        logits = obj(torch.zeros(1, 8, dtype=torch.long))
        assert logits.shape == (1, 8, obj.vocab_size)
    elif group == "data":
        assert isinstance(obj, TextDataModule)
        obj.setup("fit")
        x, y = next(iter(obj.train_dataloader()))
        assert x.shape == (cfg.data.batch_size, cfg.data.seq_len) and torch.equal(x[:, 1:], y[:, :-1])
    elif group == "logger":
        assert Path(obj.save_dir) == Path(cfg.paths.output_dir)
        assert type(obj).__name__ == {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger"}[option]


# ids "recipe=<name>": a bare "gpu" id would read as the gpu marker's keyword (and be skipped).
@pytest.mark.parametrize("recipe", RECIPES, ids=[f"recipe={r}" for r in RECIPES])
def test_every_recipe_composes_and_instantiates(make_cfg, recipe):
    from nvfp4_qat import NVFP4Recalibration
    from nvfp4_qat.lm import CausalLMModule, TextDataModule

    cfg = make_cfg(f"recipe={recipe}")
    module = instantiate(cfg.model)
    assert isinstance(module, CausalLMModule)
    assert isinstance(instantiate(cfg.data), TextDataModule)
    assert isinstance(instantiate(cfg.callback), NVFP4Recalibration)
    assert isinstance(_cpu_trainer(cfg), Trainer)
    instantiate(cfg.logger)
    params = sum(p.numel() for p in module.parameters())
    if recipe == "comparison":
        assert cfg.compare is True
    if recipe == "hf_causal_lm":
        assert type(module.net).__name__ == "LlamaForCausalLM"
        assert cfg.data.tokenizer == "hf" and cfg.data.tokenizer_path == cfg.model.net.path
        assert cfg.stages.fp.steps == 0
    if recipe == "gpu":
        assert 100e6 <= params <= 1e9, params  # the issue's ~100M-1B range
        assert cfg.trainer.precision == "bf16-mixed" and cfg.calibrator.backend == "triton"
    else:
        assert cfg.trainer.accelerator == "cpu"


def test_default_recipe_is_the_plain_command(make_cfg):
    assert make_cfg() == make_cfg("recipe=default")


def test_recipes_override_the_primary_config(make_cfg):
    # `_self_` comes first in the defaults list, so a recipe's values win over the primary's.
    assert make_cfg("recipe=gpu").stages.fp.steps == 2000
    assert make_cfg("recipe=gpu", "stages.fp.steps=3").stages.fp.steps == 3


@pytest.mark.gpu
def test_gpu_recipe_trainer_instantiates_on_cuda(make_cfg):
    trainer = instantiate(make_cfg("recipe=gpu").trainer, max_steps=1)
    assert trainer.strategy.root_device.type == "cuda"


def _yaml_files() -> list[Path]:
    return sorted((REPO / "conf").rglob("*.yaml")) + sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_key_has_a_comment_and_every_file_a_purpose(path):
    lines = path.read_text().splitlines()
    body = [ln for ln in lines if not ln.startswith("# @package")]
    assert body and body[0].startswith("# "), f"{path.name} must open with a one-line purpose comment"
    keys = [ln for ln in lines if re.match(r"^\s*(- )?[\w./@-]+:", ln) and not ln.lstrip().startswith("#")]
    uncommented = [ln for ln in keys if "#" not in ln and ln.strip() not in ("defaults:", "_target_:")]
    uncommented = [ln for ln in uncommented if not re.match(r"^\s*_(target|partial)_:", ln)]
    assert not uncommented, f"{path.name}: keys without a comment: {uncommented}"


def test_recipes_readme_lists_every_recipe():
    readme = (REPO / "recipes" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w-]+)` \|", readme, flags=re.M))
    assert listed == set(RECIPES)


def test_pyproject_lists_every_package():
    # tomllib is Python >= 3.11 only; the one line is easy to read directly.
    line = re.search(r"^packages = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), flags=re.M)
    packages = set(re.findall(r'"([\w.]+)"', line.group(1)))
    src = REPO / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert found | {"nvfp4_qat.conf"} == packages


def test_user_hydra_app_finds_the_configs_by_search_path(tmp_path):
    (tmp_path / "my_app.yaml").write_text(
        "defaults:\n  - calibrator: reference\n  - quant: w4a4\n  - _self_\n"
        "hydra:\n  searchpath:\n    - pkg://nvfp4_qat.conf\n"
    )
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose("my_app")
    assert cfg.calibrator.backend == "reference"
    assert instantiate(cfg.quant, backend="reference").quantize_activations is True


@pytest.mark.slow
def test_non_editable_install_ships_configs(tmp_path):
    """Build a wheel from a copy of the repository, install it into a directory, compose from elsewhere."""
    src = tmp_path / "repo"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "src", "conf", "recipes"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"symlinks": True} if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("nvfp4_qat-*.whl"))
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    assert (target / "nvfp4_qat" / "conf" / "recipe" / "comparison.yaml").is_file()
    assert (target / "nvfp4_qat" / "conf" / "recipe" / "README.md").is_file()
    probe = (
        "import nvfp4_qat.conf as c; from hydra import compose, initialize_config_module\n"
        "with initialize_config_module('nvfp4_qat.conf', version_base='1.3'):\n"
        "    cfg = compose('nvfp4_qat', overrides=['recipe=comparison', 'calibrator=reference'])\n"
        "print(c.__file__, cfg.compare, cfg.calibrator.backend)\n"
    )
    # PYTHONPATH puts the install before site-packages (and before the editable install, if any).
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(target / "nvfp4_qat" / "conf" / "__init__.py"), "True", "reference"]


def test_yaml_values_equal_the_python_defaults(make_cfg):
    """A default is written once: where a config restates a constructor argument with a literal, it
    is the constructor's default (interpolations such as ``${seed}`` and ``null`` paths aside)."""
    import inspect

    from nvfp4_qat import NVFP4Recalibration
    from nvfp4_qat.lm import TextDataModule

    cfg = make_cfg()
    for node, cls in ((cfg.data, TextDataModule), (cfg.callback, NVFP4Recalibration)):
        params = inspect.signature(cls.__init__).parameters
        raw = OmegaConf.to_container(node, resolve=False)
        checked = 0
        for key, value in raw.items():
            if key == "_target_" or (isinstance(value, str) and "${" in value):
                continue
            default = params[key].default
            assert value == (list(default) if isinstance(default, tuple) else default), (cls.__name__, key)
            checked += 1
        assert checked >= 8, cls.__name__
