"""Item 6 of issue 16 (the plot): the comparison's variants are readable in a zoomed panel."""

from nvfp4_qat.lm.report import build_figure, plot_run
from nvfp4_qat.lm.run import RunResult, StageResult


def _stage(name, losses, step=50):
    history = [{"step": i * step, "val_loss": v, "weight_mse": 1e-5} for i, v in enumerate(losses)]
    return StageResult(
        name=name, steps=step * (len(losses) - 1), seconds=1.0, val_loss=losses[-1], history=history
    )


def _comparison_run() -> RunResult:
    fp = _stage("fp", [5.5, 3.0, 2.2, 1.95, 1.90])  # the full-precision stage spans 3.6 nats
    result = RunResult(
        stages=[
            fp,
            _stage("fp_continued", [1.900, 1.880, 1.870, 1.866]),
            _stage("qat_frozen", [1.915, 1.905, 1.898, 1.893]),
            _stage("qat", [1.915, 1.899, 1.889, 1.881]),
        ],
        model="GPT, 0.88M parameters",
    )
    result.comparison = [
        ("full precision", 1.866),
        ("PTQ, max scales", 1.962),
        ("PTQ, MSE-swept scales", 1.931),
        ("QAT, frozen scales", 1.893),
        ("QAT, periodic recalibration", 1.881),
    ]
    return result


def test_comparison_plot_zooms_on_the_variants(tmp_path):
    fig = build_figure(_comparison_run())
    ax_loss, ax_zoom, ax_mse = fig.axes
    lo, hi = ax_zoom.get_ylim()
    assert lo < 1.866 and hi > 1.962  # every variant and both PTQ points inside ...
    assert hi - lo < 0.15  # ... on a scale ~25x finer than the whole run's (5.5 -> 1.87)
    full_lo, full_hi = ax_loss.get_ylim()
    assert full_hi - full_lo > 3.0
    x_lo, _ = ax_zoom.get_xlim()
    assert x_lo > 150  # the zoom starts near where full precision ended (step 200)
    texts = {t.get_text().strip() for t in ax_zoom.texts}
    assert {"1.8660", "1.8930", "1.8810"} <= texts  # final values written beside the lines
    assert len([line for line in ax_zoom.get_lines() if line.get_label().startswith("PTQ")]) == 2
    assert ax_mse.get_xlabel() == "optimizer step"
    assert plot_run(_comparison_run(), tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_single_qat_run_keeps_two_panels():
    result = _comparison_run()
    result.stages = [result.stages[0], result.stages[-1]]
    result.comparison = []
    assert len(build_figure(result).axes) == 2


def test_summary_names_a_slow_first_recalibration():
    """Issue 17 item 4: a first recalibration that compiled the kernels is said in the summary."""
    from nvfp4_qat.lm.report import format_summary

    def run(seconds, device):
        qat = _stage("qat", [1.9, 1.88])
        qat.device = device
        qat.recalibrations = [
            {"step": 10 * i, "seconds": t, "mse_before": 2e-5, "mse_after": 1e-5, "changed_fraction": 0.1}
            for i, t in enumerate(seconds)
        ]
        return format_summary(RunResult(stages=[qat], model="GPT"))

    text = run([9.2, 0.04, 0.05, 0.04], "cuda:0")
    line = next(ln for ln in text.splitlines() if "first one" in ln)
    assert "9.20 s (the others 0.04 s each, median)" in line and "Triton kernels" in line
    assert "first one" not in run([0.8, 0.04], "cuda:0")  # under a second: nothing to say
    assert "first one" not in run([1.5, 1.2, 1.1], "cpu")  # not slower than the others
    cpu = next(ln for ln in run([3.0], "cpu").splitlines() if "first one" in ln)
    assert "3.00 s" in cpu and "Triton" not in cpu
