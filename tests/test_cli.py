"""The ``nvfp4-qat`` command end to end, with tiny overrides so that each run takes seconds.

Most runs call :func:`nvfp4_qat.cli.main` in-process with a patched ``sys.argv`` (exactly what the
console script does); two subprocess tests cover the installed console script and
``python -m nvfp4_qat``, and one runs the Triton sweep in its CPU interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from nvfp4_qat import cli
from tiny_hf import save_tiny_llama

# A 30K-parameter GPT on 40K characters: 4 full-precision and 4 QAT steps, recalibrating every 2.
TINY = [
    "stages.fp.steps=4",
    "stages.qat.steps=4",
    "callback.every_n_train_steps=2",
    "callback.settle_fraction=0",
    "data.max_chars=40000",
    "data.seq_len=32",
    "data.batch_size=8",
    "model.net.d_model=32",
    "model.net.n_layer=1",
    "model.net.n_head=2",
    "model.warmup_steps=2",
    "trainer.val_check_interval=2",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["nvfp4-qat", *args])
    GlobalHydra.instance().clear()
    try:
        cli.main()
    finally:
        GlobalHydra.instance().clear()


def fail_cli(monkeypatch, capsys, *args: str) -> str:
    """Run a command that must fail with a user message; return that message."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nvfp4-qat: error:") and "Traceback" not in err
    return " ".join(err.split())


def test_default_job_writes_summary_plot_and_logs(monkeypatch, capsys, tmp_path):
    run_cli(monkeypatch, *TINY, f"hydra.run.dir={tmp_path}")
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("fp", 4), ("qat", 4)]
    fp, qat = summary["stages"]
    assert fp["recalibrations"] == [] and all(h["weight_mse"] is None for h in fp["history"])
    # Calibrated once by quantize_model (not again when fit starts), then after steps 2 and 4.
    assert [r["step"] for r in qat["recalibrations"]] == [2, 4]
    # Evaluated right after quantization (step 0), then at each validation.
    assert [h["step"] for h in qat["history"]] == [0, 2, 4] and all(
        h["weight_mse"] > 0 for h in qat["history"]
    )
    last = qat["recalibrations"][-1]
    assert last["mse_after"] <= last["mse_before"]  # the sweep is MSE-optimal per block
    text = (tmp_path / "summary.txt").read_text()
    assert text.strip() in out
    assert "recalibrations  2 (after steps 2, 4)" in text and "time share" in text
    # the summary names where everything went
    assert f"run dir         {tmp_path}" in text and f"log             {tmp_path / 'nvfp4_qat.log'}" in text
    assert "checkpoint" in text and str(tmp_path / "logs" / "qat" / "checkpoints") in text
    # the log file holds the run's messages, Lightning's banners once per run (not once per Trainer)
    log = (tmp_path / "nvfp4_qat.log").read_text()
    assert "CPU run with" in log and "`Trainer.fit` stopped" in log
    assert log.count("GPU available") == 1 and log.count("Tip: For seamless cloud logging") <= 1
    # output that is no terminal gets plain progress lines, no carriage returns or escape codes
    assert "stage qat: step 2/4" in out and "stage qat: step 4/4" in out and "(done)" in out
    assert "NVFP4 recalibration after step 2: 4 layers" in out and "... done in" in out
    assert "\r" not in out and "\x1b[" not in out
    assert f"weight MSE {last['mse_before']:.4e} -> {last['mse_after']:.4e}" in text
    assert (tmp_path / "nvfp4_qat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (tmp_path / "logs" / "qat" / "metrics.csv").read_text().splitlines()[0]
    assert "nvfp4/mse_before" in header and "val/loss" in header
    assert (tmp_path / "logs" / "fp" / "metrics.csv").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("recipe", ["default", "comparison", "hf_causal_lm"])
def test_cpu_recipes_run_with_fast_dev_run(monkeypatch, capsys, tmp_path, hf_dir, recipe):
    # The recipes as they are, only the GPT narrower (each sweep of the full 0.8M weights costs ~1 s).
    small_gpt = ["model.net.d_model=64", "model.net.n_layer=2"]
    extra = [f"model.net.path={hf_dir}"] if recipe == "hf_causal_lm" else small_gpt
    run_cli(
        monkeypatch,
        f"recipe={recipe}",
        "trainer.fast_dev_run=true",
        "data.max_chars=60000",
        f"hydra.run.dir={tmp_path}",
        *extra,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert (
        names
        == {
            "default": ["fp", "qat"],
            "comparison": [
                "fp",
                "fp_finetune",
                "qat_frozen",
                "qat_max_step",
                "qat_mse",
                "qat_guarded",
                "qat",
            ],
            "hf_causal_lm": ["qat"],
        }[recipe]
    )
    assert all(s["steps"] == 1 for s in summary["stages"])
    if recipe == "comparison":
        rows = summary["comparison"]
        assert [r["variant"] for r in rows] == [
            "full precision (fine-tuned)",
            "PTQ, max scales",
            "PTQ, MSE-swept scales",
            "QAT, frozen scales",
            "QAT, max scales every step",
            "QAT, plain MSE re-sweep every 18 steps",  # stages.qat.steps // 8 (callback=frozen)
            "QAT, loss_check_layer every 18 steps, settle 0.4",
            "QAT, the configured callback",
        ]
        assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in rows)
        assert "comparison: validation cross-entropy" in capsys.readouterr().out
    if recipe == "hf_causal_lm":
        assert summary["model"].startswith("LlamaForCausalLM") and "net.lm_head" in summary["model"]
    assert (tmp_path / "nvfp4_qat.png").is_file()


@pytest.mark.gpu
def test_gpu_recipe_runs_with_fast_dev_run(monkeypatch, tmp_path):
    run_cli(
        monkeypatch,
        "recipe=gpu",
        "trainer.fast_dev_run=true",
        "data.max_chars=2000000",
        f"hydra.run.dir={tmp_path}",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["fp", "qat"]
    assert all(s["device"].startswith("cuda") and s["tokens_per_second"] > 0 for s in summary["stages"])
    assert len(summary["stages"][-1]["recalibrations"]) == 1  # at fit start; one step, no period


def test_multirun_sweeps_the_schedule(monkeypatch, tmp_path):
    tiny = [o for o in TINY if not o.startswith(("callback.every_n_train_steps", "stages.fp"))]
    tiny.append("stages.fp.steps=0")  # QAT only: the sweep is over the recalibration schedule
    run_cli(monkeypatch, "-m", "callback.every_n_train_steps=2,4", *tiny, f"hydra.sweep.dir={tmp_path}")
    steps = [
        [
            r["step"]
            for r in json.loads((tmp_path / job / "summary.json").read_text())["stages"][-1]["recalibrations"]
        ]
        for job in ("0", "1")
    ]
    assert steps == [[2, 4], [4]]  # no fit-start entry: quantize_model has just calibrated


def test_unknown_names_get_a_message(monkeypatch, capsys):
    err = fail_cli(monkeypatch, capsys, "calibrator=tritn")
    assert "unknown calibrator 'tritn'" in err and "Available: auto, reference, triton" in err
    err = fail_cli(monkeypatch, capsys, "recipe=comparisn")
    assert "unknown recipe 'comparisn'" in err and "recipes/README.md" in err


def test_missing_model_directory_gets_a_message(monkeypatch, capsys, tmp_path):
    err = fail_cli(monkeypatch, capsys, "recipe=hf_causal_lm", f"hydra.run.dir={tmp_path}")
    assert "required value(s) not set: model.net.path" in err
    err = fail_cli(
        monkeypatch,
        capsys,
        "recipe=hf_causal_lm",
        f"model.net.path={tmp_path / 'nope'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert "does not exist" in err and "never downloads" in err


def test_gpu_only_settings_on_a_cpu_machine_get_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["trainer=gpu"], ["recipe=gpu"]):
        err = fail_cli(monkeypatch, capsys, *args, f"hydra.run.dir={tmp_path}")
        assert "trainer.accelerator=gpu needs a CUDA GPU" in err and "trainer=cpu" in err


def test_triton_calibrator_where_it_cannot_run_gets_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = fail_cli(monkeypatch, capsys, "calibrator=triton", f"hydra.run.dir={tmp_path}")
    assert "needs the model on a CUDA GPU" in err and "calibrator=reference" in err
    monkeypatch.setattr("nvfp4_qat._backend.triton_available", lambda: False)
    err = fail_cli(monkeypatch, capsys, "calibrator=triton", f"hydra.run.dir={tmp_path}")
    assert "needs the `triton` package" in err


def _scripts_dir() -> Path:
    return Path(sys.executable).parent


def test_console_script_and_python_m(tmp_path):
    job = subprocess.run(
        [str(_scripts_dir() / "nvfp4-qat"), "recipe=comparison", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "compare: true" in job.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "nvfp4_qat", "calibrator=nope"], cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown calibrator 'nope'" in bad.stderr and "Traceback" not in bad.stderr


_PARITY = """
import sys
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from nvfp4_qat import quantize_model, recalibrate
from nvfp4_qat.modules import NVFP4Linear

scales = {}
for calibrator in ("reference", "triton"):
    with initialize_config_module("nvfp4_qat.conf", version_base="1.3"):
        cfg = compose("nvfp4_qat", overrides=[f"calibrator={calibrator}", "paths.output_dir=.", *sys.argv[1:]])
    torch.manual_seed(0)
    module = instantiate(cfg.model)  # the default model, as the embedded default builds it
    quantize_model(module, instantiate(cfg.quant))  # first calibration: quant.backend
    with torch.no_grad():  # weights move as in QAT, then the calibrator re-sweeps
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    recalibrate(module, backend=cfg.calibrator.backend, method=cfg.calibrator.method)
    scales[calibrator] = {n: m.block_amax.clone() for n, m in module.named_modules() if isinstance(m, NVFP4Linear)}
ref, tri = scales["reference"], scales["triton"]
print(len(ref), sum(v.numel() for v in ref.values()),
      sum(int((ref[n] != tri[n]).sum()) for n in ref), ref.keys() == tri.keys())
"""


@pytest.mark.slow
def test_reference_and_triton_calibrators_give_identical_scales(tmp_path):
    """The default model's first attention projection, swept by both calibrators, twice.

    Triton's CPU interpreter sweeps ~300 blocks/s here, so CI checks one layer (3072 blocks, ~20 s);
    without the `quant.include` override the same script checks all 16 layers (49152 blocks, ~5 min).
    """
    import triton  # noqa: F401 - a dependency: fail, never skip, if it is missing

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PARITY, "quant.include=[net.blocks.0.qkv]"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    layers, blocks, differing, same_layers = out
    assert (int(layers), int(blocks), same_layers) == (1, 3072, "True")
    assert int(differing) == 0, f"{differing} of {blocks} block scales differ between reference and triton"


# ---- early checks (issue 13 item 5, issue 16 item 3): before any training, naming the key -------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["stages.qat.steps=-1"], "stages.qat.steps must be an integer >= 0"),
        (["stages.fp.steps=abc"], "stages.fp.steps must be an integer >= 0"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["stages.qat.lr=fast"], "stages.qat.lr must be a number > 0"),
        (["callback.every_n_train_steps=-1"], "callback: `every_n_train_steps` must be an int >= 0, got -1"),
        (["quant.gradient=magic"], "quant: "),
        (["callback.export_path=."], "callback.export_path cannot be used: export path '.'"),
        (["trainer.max_steps=10"], "trainer.max_steps is set by the command for each stage"),
        (["+trainer.max_steps=10"], "trainer.max_steps is set by the command for each stage"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_bad_values_fail_before_training(monkeypatch, capsys, tmp_path, args, expected):
    import lightning.pytorch as pl

    def no_training(*a, **k):
        raise AssertionError("training started before the config was checked")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    err = fail_cli(monkeypatch, capsys, *args, f"hydra.run.dir={tmp_path}")
    assert expected in err, err


def test_tensorboard_logger_without_tensorboard_names_the_extra(monkeypatch, capsys, tmp_path):
    from nvfp4_qat.lm import checks

    monkeypatch.setattr(checks, "_module_available", lambda name: False)
    err = fail_cli(monkeypatch, capsys, "logger=tensorboard", f"hydra.run.dir={tmp_path}")
    assert "pip install 'nvfp4_qat[tensorboard]'" in err


def test_logger_null_runs_and_keeps_checkpoints_in_the_run_dir(monkeypatch, capsys, tmp_path):
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    run_dir = tmp_path / "run"
    run_cli(monkeypatch, *TINY, "logger=null", "plot=false", f"hydra.run.dir={run_dir}")
    assert os.listdir(launch) == []  # nothing written into the launch directory
    ckpts = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.ckpt"))
    assert len(ckpts) == 2 and ckpts[0].startswith("logs/fp/") and ckpts[1].startswith("logs/qat/"), ckpts


def test_cpu_threads_leave_busy_cores_alone():
    from nvfp4_qat.lm.console import cpu_threads

    assert cpu_threads(cores=2, load=0.0) == 2  # idle: every core
    assert cpu_threads(cores=2, load=1.2) == 1  # one core busy
    assert cpu_threads(cores=2, load=3.5) == 1  # oversubscribed: one thread, never 0
    assert cpu_threads(cores=16, load=4.0) == 12


def test_cpu_threads_respect_the_users_choice(monkeypatch):
    from nvfp4_qat.lm.console import setup_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "OMP_NUM_THREADS is set" in setup_cpu_threads("cpu")
    assert torch.get_num_threads() == before  # untouched
    assert setup_cpu_threads("gpu") is None


def test_default_callback_keeps_the_scales_frozen(monkeypatch, capsys, tmp_path):
    # The command's default (callback=frozen): quantize_model's MSE calibration, then no re-sweep.
    args = [a for a in TINY if not a.startswith("callback.")]
    run_cli(monkeypatch, *args, "plot=false", f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"][-1]["recalibrations"] == []
    assert (
        "recalibrations  0 (block scales frozen after the initial MSE calibration)" in capsys.readouterr().out
    )


def test_multirun_trains_the_fp_stage_once_and_writes_one_table(monkeypatch, capsys, tmp_path):
    # Two jobs that differ only after the fp stage (plot on/off): the second loads the first's
    # fp weights, so both QAT stages start from the same point and end identically (CPU, same seed).
    tiny = [o for o in TINY if not o.startswith("callback.every_n_train_steps")]
    run_cli(monkeypatch, "-m", "plot=true,false", *tiny, f"hydra.sweep.dir={tmp_path}")
    first, second = (json.loads((tmp_path / job / "summary.json").read_text()) for job in ("0", "1"))
    assert first["stages"][0] == second["stages"][0]  # the fp stage's result, reused as recorded
    assert first["stages"][-1]["val_loss"] == second["stages"][-1]["val_loss"]
    assert len(list((tmp_path / ".fp_cache").glob("*.pt"))) == 1
    assert "reused" in (tmp_path / "1" / "nvfp4_qat.log").read_text()
    table = (tmp_path / "multirun_summary.txt").read_text()
    assert table.startswith(f"nvfp4-qat multirun: 2 jobs in {tmp_path}")
    loss = first["stages"][-1]["val_loss"]
    rows = table.splitlines()[1:]
    assert rows[0].startswith(f"   0  QAT val loss {loss:.4f}  plot=True ")
    assert rows[1].startswith(f"   1  QAT val loss {loss:.4f}  plot=False ")
    assert table in capsys.readouterr().out


def test_fp_cache_key_ignores_what_comes_after_the_fp_stage():
    from omegaconf import OmegaConf

    from nvfp4_qat.lm.multirun import fp_cache_key

    base = OmegaConf.create({"model": {"d": 1}, "data": {"x": 2}, "trainer": {}, "seed": 0,
                             "stages": {"fp": {"steps": 4, "lr": 0.1}, "qat": {"steps": 4}}, "callback": {"a": 1}})  # fmt: skip
    other = OmegaConf.merge(base, {"callback": {"a": 2}, "stages": {"qat": {"steps": 9}}, "plot": False})
    assert fp_cache_key(base) == fp_cache_key(other)
    for change in ({"seed": 1}, {"stages": {"fp": {"lr": 0.2}}}, {"model": {"d": 2}}, {"data": {"x": 3}}):
        assert fp_cache_key(OmegaConf.merge(base, change)) != fp_cache_key(base), change
