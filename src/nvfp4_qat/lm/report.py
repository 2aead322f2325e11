"""The summary ``nvfp4-qat`` prints (and saves), and its PNG plot.

The plot has two panels over one step axis (the QAT stages continue where the full-precision
stage ended): validation loss of every stage (with the comparison, a third panel between them
zooms on the stages after full precision, where the variants differ by hundredths of a nat), and
the NVFP4 weight MSE at the scales in use, a
sawtooth per QAT stage: it grows while the weights drift away from their scales (measured at each
validation and as each recalibration's ``mse_before``) and drops at each recalibration (triangles,
``mse_after``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path

from nvfp4_qat.lm.run import RunResult, StageResult

__all__ = ["build_figure", "format_summary", "output_files", "plot_run", "summary_dict", "write_summary"]

_STAGE_STYLE = {  # label, colour, line style
    "fp": ("full precision", "0.45", "-"),
    "fp_finetune": ("full precision, fine-tuned", "0.45", ":"),
    "qat_frozen": ("QAT, frozen scales", "tab:orange", "--"),
    "qat_max_step": ("QAT, max scales every step", "tab:purple", "-."),
    "qat_mse": ("QAT, plain MSE re-sweep", "tab:red", ":"),
    "qat_guarded": ("QAT, loss_check_layer", "tab:green", "--"),
    "qat": ("QAT, the configured callback", "tab:blue", "-"),
}


def _ppl(loss: float | None) -> str:
    return "n/a" if loss is None else f"{math.exp(min(loss, 700.0)):.3f}"


def _stage_line(stage: StageResult) -> str:
    speed = f", {stage.tokens_per_second / 1e3:.1f}k tokens/s" if stage.tokens_per_second else ""
    loss = "n/a" if stage.val_loss is None else f"{stage.val_loss:.4f}"
    first = stage.history[0] if stage.history else None
    if (
        stage.name.startswith("qat")
        and first is not None
        and first["step"] == 0
        and first["val_loss"] is not None
    ):
        loss = f"{first['val_loss']:.4f} when quantized -> {loss}"
    return (
        f"{stage.steps} steps, {stage.seconds:.1f} s on {stage.device}{speed}; "
        f"val loss {loss} (ppl {_ppl(stage.val_loss)})"
    )


def output_files(out_dir: Path, export_path: str | None = None) -> list[tuple[str, str]]:
    """``(what, path)`` rows naming the job's files: run dir, log, checkpoints, NVFP4 export."""
    rows = [("run dir", str(out_dir))]
    log = out_dir / "nvfp4_qat.log"
    if log.exists():
        rows.append(("log", str(log)))
    for ckpt in sorted(out_dir.rglob("*.ckpt")):
        rows.append(("checkpoint", str(ckpt)))
    if export_path:
        rows.append(("NVFP4 export", str(Path(export_path).resolve())))
    return rows


#: A first recalibration slower than this (and than twice the later ones) is worth a line: on a GPU
#: it compiled or loaded the Triton kernels (BENCHMARKS.md, session 5: under 1 s from a warm cache).
FIRST_CALL_NOTE_S = 1.0


def _first_recalibration(recal: list[dict], device: str) -> str | None:
    """A line when the first recalibration took noticeably longer than the others, else ``None``."""
    first = recal[0]["seconds"]
    rest = sorted(r["seconds"] for r in recal[1:])
    typical = rest[len(rest) // 2] if rest else None
    if first <= FIRST_CALL_NOTE_S or (typical is not None and first <= 2 * typical):
        return None
    line = f"{first:.2f} s" + (f" (the others {typical:.2f} s each, median)" if typical is not None else "")
    if device.startswith("cuda"):
        line += (
            "; it compiled or loaded the Triton kernels (first use in this process: under 1 s "
            "from a warm Triton cache, several seconds when they compile)"
        )
    return line


def format_summary(
    result: RunResult, plot_path: Path | None = None, files: list[tuple[str, str]] | None = None
) -> str:
    """The human-readable summary: stages, recalibrations, time share, files, comparison table."""
    rows = [("model", result.model), ("data", result.data)]
    rows += [(f"stage {s.name}", _stage_line(s)) for s in result.stages]
    qat = result.stage("qat")
    recal = qat.recalibrations if qat else []
    steps = ", ".join(str(r["step"]) for r in recal[:12]) + (" ..." if len(recal) > 12 else "")
    detail = (
        f" (after steps {steps})" if recal else " (block scales frozen after the initial MSE calibration)"
    )
    rows.append(("recalibrations", f"{len(recal)}{detail}"))
    if recal:
        last = recal[-1]
        before, after = last["mse_before"], last["mse_after"]
        change = f" ({100 * (after - before) / before:+.1f}%)" if before else ""
        rows.append(
            (
                "last one",
                f"step {last['step']}: weight MSE {before:.4e} -> {after:.4e}{change}, "
                f"{100 * last['changed_fraction']:.1f}% of block scales moved",
            )
        )
        first_row = _first_recalibration(recal, qat.device)
        if first_row:
            rows.append(("first one", first_row))
        spent = sum(r["seconds"] for r in recal)
        share = 100 * spent / qat.seconds if qat.seconds > 0 else float("nan")
        rows.append(
            (
                "time share",
                f"recalibrating took {spent:.2f} s = {share:.1f}% of the {qat.seconds:.1f} s QAT stage",
            )
        )
    if plot_path is not None:
        rows.append(("plot", str(plot_path)))
    rows += files or []
    width = max(len(k) for k, _ in rows)
    lines = ["nvfp4-qat summary"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    width = max([len(label) for label, _ in result.comparison] + [30])
    if result.comparison:
        lines += [
            "",
            "  comparison: validation cross-entropy (nats/token). PTQ and every QAT row start from the",
            "  fine-tuned full-precision weights (the first row); the QAT rows then train stages.qat more",
            "  steps on the same batches, which is why they can end below it. Compare the QAT rows.",
            f"  {'variant':<{width}} {'val loss':>9} {'perplexity':>11} {'vs full precision':>18}",
        ]
        base = result.comparison[0][1]
        for i, (label, loss) in enumerate(result.comparison):
            delta = "" if i == 0 or loss is None or base is None else f"{loss - base:+.4f}"
            shown = "n/a" if loss is None else f"{loss:.4f}"
            lines.append(f"  {label:<{width}} {shown:>9} {_ppl(loss):>11} {delta:>18}")
    return "\n".join(lines)


def summary_dict(result: RunResult) -> dict:
    """The summary as JSON-ready data (also records the versions that produced it)."""
    import torch

    from nvfp4_qat import __version__

    return {
        "model": result.model,
        "data": result.data,
        "stages": [dataclasses.asdict(s) for s in result.stages],
        "comparison": [
            {
                "variant": label,
                "val_loss": loss,
                "perplexity": None if loss is None else math.exp(min(loss, 700.0)),
            }
            for label, loss in result.comparison
        ],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "nvfp4_qat": __version__,
        },
    }


def write_summary(
    result: RunResult, out_dir: Path, plot_path: Path | None, files: list[tuple[str, str]] | None = None
) -> str:
    """Write ``summary.txt`` and ``summary.json`` into ``out_dir``; return the text."""
    text = format_summary(result, plot_path, files)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.txt").write_text(text + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary_dict(result), indent=2) + "\n")
    return text


def _mse_sawtooth(stage: StageResult) -> list[tuple[int, float]]:
    # Time order: at one step the recalibration's before, then its after, then the validation
    # (Lightning validates after the batch-end hook that recalibrated).
    events = [(r["step"], 0, r["mse_before"]) for r in stage.recalibrations]
    events += [(r["step"], 1, r["mse_after"]) for r in stage.recalibrations]
    events += [(h["step"], 2, h["weight_mse"]) for h in stage.history if h.get("weight_mse") is not None]
    return [(step, value) for step, _, value in sorted(events, key=lambda e: e[:2])]


def _zoom_limits(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) if hi > lo else 0.01 * max(abs(hi), 1e-12)
    return lo - pad, hi + pad


def build_figure(result: RunResult):
    """The plot as a matplotlib ``Figure`` (Agg canvas): validation loss over the whole run; with
    more than one stage after the full-precision one, a second panel zoomed on the stages after
    it, where the variants differ by hundredths of a nat that the whole run's scale hides (each
    variant's final loss is written beside its last point); the NVFP4 weight MSE."""
    # The object API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fp = result.stage("fp")
    offset = fp.steps if fp else 0
    later = [s for s in result.stages if s.name != "fp"]
    zoom = fp is not None and (len(later) > 1 or bool(result.comparison))
    fig = Figure(figsize=(9, 10 if zoom else 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if zoom else 2, 1)
    ax_loss, ax_mse = axes[0], axes[-1]
    ax_mse.sharex(ax_loss)
    ax_zoom = axes[1] if zoom else None
    zoom_values: list[float] = []
    for stage in result.stages:
        label, colour, style = _STAGE_STYLE.get(stage.name, (stage.name, "k", "-"))
        shift = 0 if stage.name == "fp" else offset  # the other stages start where fp ended
        points = [(h["step"] + shift, h["val_loss"]) for h in stage.history if h["val_loss"] is not None]
        if points:
            ax_loss.plot(*zip(*points, strict=True), style, color=colour, marker="o", ms=3, label=label)
            if ax_zoom is not None and stage.name != "fp":
                ax_zoom.plot(*zip(*points, strict=True), style, color=colour, marker="o", ms=3, label=label)
                x, y = points[-1]
                ax_zoom.annotate(
                    f" {y:.4f}", (x, y), color=colour, fontsize=8, va="center", annotation_clip=False
                )
                zoom_values += [v for _, v in points]
        sawtooth = [(step + shift, value) for step, value in _mse_sawtooth(stage)]
        if sawtooth:
            ax_mse.plot(*zip(*sawtooth, strict=True), style, color=colour, label=label)
        after = [(r["step"] + shift, r["mse_after"]) for r in stage.recalibrations]
        if after:
            ax_mse.plot(*zip(*after, strict=True), "v", color=colour, ms=6, label=f"{label}: recalibrations")
        if stage.name == "qat":
            for x, _ in after:
                for ax in (ax_loss, ax_zoom):
                    if ax is not None:
                        ax.axvline(x, color=colour, alpha=0.15, lw=1)
    continued = result.stage("fp_finetune")
    ptq_x = offset + (continued.steps if continued else 0)  # PTQ quantizes the continued model's end
    for label, loss in result.comparison:
        if label.startswith("PTQ") and loss is not None:
            marker, colour = ("s", "tab:red") if "max" in label else ("D", "tab:green")
            for ax in (ax_loss, ax_zoom):
                if ax is not None:
                    ax.plot([ptq_x], [loss], marker, color=colour, ms=6, label=label)
            zoom_values.append(loss)
    if fp:
        for ax in (ax_loss, ax_mse):
            ax.axvline(offset, color="k", ls=":", lw=1)
        ax_loss.annotate(
            " QAT starts", (offset, 0.98), xycoords=("data", "axes fraction"), va="top", fontsize=8
        )
    ax_loss.set_ylabel("validation loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title(f"nvfp4-qat: {result.model}", fontsize=9)
    if ax_zoom is not None and zoom_values:
        ax_zoom.set_ylim(*_zoom_limits(zoom_values))
        end = max(offset + s.steps for s in later) if later else offset
        span = max(end - offset, 1)
        ax_zoom.set_xlim(offset - 0.02 * span, end + 0.12 * span)  # room for the final values
        ax_zoom.set_ylabel("validation loss, after full precision")
        ax_zoom.set_title("the stages after full precision, zoomed (final values at the right)", fontsize=9)
        ax_zoom.legend(fontsize=8)
    ax_mse.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_mse.set_ylabel("NVFP4 weight MSE at the scales in use")
    ax_mse.set_xlabel("optimizer step")
    if ax_mse.has_data():
        ax_mse.legend(fontsize=8)
    return fig


def plot_run(result: RunResult, path: Path) -> Path:
    """Draw validation loss and weight MSE over steps, recalibrations marked; save a PNG."""
    fig = build_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
