"""QAT quality: does re-sweeping the block scales during QAT help the trained model? (decides defaults)

Protocol (NVIDIA ModelOpt's documented QAT recipe): pretrain a byte-level GPT in full precision,
fine-tune it in full precision, then from the fine-tuned weights run post-training quantization
(PTQ) and QAT with a small learning rate. Every QAT row starts from the same weights and sees the
same batches in the same order; rows differ only in how the NVFP4 block scales are set. Output
head in high precision. Per regime (learning rate) and data seed:

* ``fp``: the fine-tuned full-precision model; ``ptq_max`` / ``ptq_mse``: max / MSE-swept scales;
* ``frozen``: QAT with the initial MSE scales, never changed;
* ``max_step``: max scales recomputed after every optimizer step (torchao's and ModelOpt's
  dynamic default);
* ``modelopt``: NVIDIA ModelOpt's own QAT (``NVFP4_DEFAULT_CFG`` / ``W4A16_NVFP4_CFG``), when
  ``modelopt`` imports (GPU);
* ``<policy>@<every>[/<settle>]``: :func:`nvfp4_qat.recalibrate` with that policy after every
  ``every``-th step, none in the last ``settle`` fraction of the steps (``mse@50`` is the old
  callback default, which also re-swept after the last step).

Recovery = (PTQ-MSE loss - QAT loss) / (PTQ-MSE loss - full-precision loss). For recalibrating
rows, the loss on two held-out "probe" batches is measured just before and after each
recalibration (eval mode): ``dprobe`` is its mean relative change. Loss-check policies evaluate
on two other held-out batches, never on the probe or validation windows.

    python benchmarks/qat_quality.py --size cpu --quant w4a4 --regimes small --seeds 3 4 5
    python benchmarks/qat_quality.py --size gpu --workers 6 --out results.jsonl   # one GPU
    python benchmarks/qat_quality.py --table results.jsonl other.jsonl            # merge and print
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import nvfp4_qat
from nvfp4_qat import QATConfig, quantize_model, recalibrate
from nvfp4_qat.policy import POLICIES, InputMoments, RecalibrationPolicy
from nvfp4_qat.quantize import nvfp4_layers


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layer: int
    n_head: int
    seq: int
    batch: int
    max_chars: int
    pretrain_steps: int
    pretrain_lr: float
    ft_steps: int
    qat_steps: int
    every: int
    regimes: dict  # name -> learning rate of fine-tune and QAT
    val_windows: int


SIZES = {
    "cpu": Size(128, 4, 4, 128, 16, 3_000_000, 800, 3e-3, 150, 200, 25, {"small": 1e-4, "large": 6e-4}, 128),
    "smoke": Size(64, 2, 2, 64, 8, 300_000, 40, 3e-3, 10, 20, 5, {"small": 1e-4, "large": 6e-4}, 32),
    "gpu": Size(
        512, 8, 8, 512, 32, 40_000_000, 2500, 1e-3, 300, 400, 50, {"small": 5e-5, "large": 3e-4}, 256
    ),
}
DEFAULT_ROWS = [
    "frozen",
    "max_step",
    "mse@E",
    "mse@E/0.4",
    "mse_keep_global@E/0.4",
    "selective@E/0.4",
    "activation@E/0.4",
    "gradient@E/0.4",
    "loss_check@E/0.4",
]


# ----------------------------------------------------------------------------------------- data
def load_tokens(max_chars: int) -> torch.Tensor:
    from nvfp4_qat.lm.data import collect_files, read_text

    text, _ = read_text(collect_files(None, "*.py", recursive=True), max_chars)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.long)


class Data:
    """Train windows drawn at random (seeded); held-out windows fixed: validation, probe, check."""

    def __init__(self, tokens: torch.Tensor, size: Size, device: str) -> None:
        split = int(tokens.numel() * 0.95)
        self.train, held = tokens[:split], tokens[split:]
        self.size, self.device = size, device
        n = size.seq + 1
        starts = torch.linspace(0, held.numel() - n - 1, size.val_windows + 4 * size.batch).long()
        windows = torch.stack([held[s : s + n] for s in starts.tolist()])
        self.val = windows[: size.val_windows].to(device)
        rest = windows[size.val_windows :].to(device)
        self.probe = [rest[0 : size.batch], rest[size.batch : 2 * size.batch]]
        self.check = [rest[2 * size.batch : 3 * size.batch], rest[3 * size.batch : 4 * size.batch]]

    def batches(self, seed: int, steps: int):
        g = torch.Generator().manual_seed(seed)
        hi = self.train.numel() - self.size.seq - 2
        for _ in range(steps):
            starts = torch.randint(0, hi, (self.size.batch,), generator=g)
            yield torch.stack([self.train[s : s + self.size.seq + 1] for s in starts.tolist()]).to(
                self.device
            )


# ------------------------------------------------------------------------------------- training
def loss_of(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", torch.bfloat16, enabled=windows.is_cuda):
        logits = model(windows[:, :-1])
        logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor | list, chunk: int = 32) -> float:
    was = model.training
    model.eval()
    parts = list(windows) if isinstance(windows, list) else list(windows.split(chunk))
    total = sum(float(loss_of(model, w)) * w.shape[0] for w in parts)
    model.train(was)
    return total / sum(w.shape[0] for w in parts)


def train(model, data: Data, seed: int, steps: int, lr: float, after_step=None) -> None:
    """AdamW (0.9, 0.95), wd 0.1, clip 1.0, 5 % warm-up then cosine to 10 %; ``after_step(i, opt)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            (i + 1) / warm
            if i < warm
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))
        ),
    )
    model.train()
    for i, batch in enumerate(data.batches(seed, steps)):
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(i, opt)


def build_model(size: Size, device: str) -> nn.Module:
    from nvfp4_qat.lm import GPT

    torch.manual_seed(0)
    return GPT(256, size.seq, size.d_model, size.n_layer, size.n_head).to(device)


# ----------------------------------------------------------------------------------------- rows
def parse_row(row: str, every: int) -> tuple[str, int, float]:
    """``policy@every[/settle]`` -> ``(policy, every, settle)``; ``E`` stands for the size's every."""
    name, _, sched = row.partition("@")
    freq, _, settle = sched.partition("/")
    if name not in POLICIES:
        raise SystemExit(f"unknown row {row!r}: policies are {sorted(POLICIES)}")
    return name, every if freq in ("E", "") else int(freq), float(settle or 0.0)


def quant_config(quant: str) -> QATConfig:
    return QATConfig(exclude=("lm_head",), quantize_activations=quant == "w4a4")


def run_qat_row(row: str, ft_state, quant: str, size: Size, data: Data, seed: int, lr: float, device: str):
    model = build_model(size, device)
    model.load_state_dict(ft_state)
    out: dict = {"recals": []}
    if row == "modelopt":
        return run_modelopt(model, quant, size, data, seed, lr, out)
    quantize_model(model, quant_config(quant))
    layers = [m for _, m in nvfp4_layers(model)]
    hook = None
    if row == "act_init":
        activation_calibrate(model, data)
    if row in ("frozen", "act_init"):
        after = None
    elif row == "max_step":

        def after(i, opt):
            for m in layers:
                m.init_scales("max")

        for m in layers:
            m.init_scales("max")
    else:
        policy, every, settle = parse_row(row, size.every)
        stop = size.qat_steps if settle == 0 else int(size.qat_steps * (1 - settle))
        hook = InputMoments(nvfp4_layers(model)) if POLICIES[policy].needs_input_moments else None

        def after(i, opt):
            if (i + 1) % every or i >= stop:
                return
            before = evaluate(model, data.probe)
            r = recalibrate(
                model,
                policy=policy,
                optimizer=opt,
                input_moments=hook,
                evaluate=lambda: evaluate(model, data.check),
            )
            after_loss = evaluate(model, data.probe)
            out["recals"].append(
                {
                    "step": i + 1,
                    "probe_before": before,
                    "probe_after": after_loss,
                    "changed": r.changed_fraction,
                    "rolled_back": r.rolled_back,
                    "seconds": r.seconds,
                }
            )
            if hook is not None:
                hook.reset()

    start = time.perf_counter()
    train(model, data, 1000 + seed, size.qat_steps, lr, after)
    out["train_seconds"] = time.perf_counter() - start
    if hook is not None:
        hook.remove()
    out["val"] = evaluate(model, data.val)
    return out


ACTIVATION = RecalibrationPolicy(criterion="activation", keep_global_amax=True)


def activation_calibrate(model: nn.Module, data: Data, batches: int = 8) -> None:
    """From the MSE scales, one activation-weighted recalibration with the input second moments
    of ``batches`` training batches (eval-mode forwards, the calibration data of a PTQ)."""
    with InputMoments(nvfp4_layers(model), training_only=False) as moments:
        evaluate(model, list(data.batches(7, batches)))
        recalibrate(model, policy=ACTIVATION, input_moments=moments)


def run_modelopt(model, quant, size, data, seed, lr, out):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG if quant == "w4a4" else mtq.W4A16_NVFP4_CFG)
    quant_cfg = cfg["quant_cfg"]  # a list of entries in ModelOpt 0.47, a dict before
    if isinstance(quant_cfg, list):
        quant_cfg.append({"quantizer_name": "*lm_head*", "enable": False})
    else:
        quant_cfg["*lm_head*"] = {"enable": False}
    calib = list(data.batches(7, 4))

    def loop(m):
        for b in calib:
            loss_of(m, b)

    mtq.quantize(model, cfg, loop)
    start = time.perf_counter()
    train(model, data, 1000 + seed, size.qat_steps, lr)
    out["train_seconds"] = time.perf_counter() - start
    out["val"] = evaluate(model, data.val)
    return out


def run_job(args_tuple) -> list[dict]:
    """One (regime, seed): fine-tune, then PTQ and every QAT row for every quant mode."""
    size_name, regime, seed, quants, rows, device, pre_path, threads, out = args_tuple
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # the kernels launch on the current device
    size = SIZES[size_name]
    lr = size.regimes[regime]
    data = Data(load_tokens(size.max_chars), size, device)
    model = build_model(size, device)
    model.load_state_dict(torch.load(pre_path, map_location=device))
    train(model, data, seed, size.ft_steps, lr)
    ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []

    def emit(quant, row, **values):
        results.append({"regime": regime, "seed": seed, "quant": quant, "row": row, **values})
        if out:  # one JSON line per row as soon as it is done: a run cut short keeps what it did
            with open(out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
        print(f"[{regime} s{seed} {quant}] {row:<24} val {values['val']:.4f}", flush=True)

    emit("-", "fp", val=evaluate(model, data.val))
    for quant in quants:
        for init in ("max", "mse", "act"):
            m = build_model(size, device)
            m.load_state_dict(ft_state)
            quantize_model(m, quant_config(quant).replace(init_calibration="max" if init == "max" else "mse"))
            if init == "act":
                activation_calibrate(m, data)
            emit(quant, f"ptq_{init}", val=evaluate(m, data.val))
        for row in rows:
            if row == "modelopt" and not _modelopt_available():
                continue
            emit(quant, row, **run_qat_row(row, ft_state, quant, size, data, seed, lr, device))
    return results


def _modelopt_available() -> bool:
    try:
        import modelopt.torch.quantization  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- table
def table(results: list[dict]) -> str:
    fp = {(r["regime"], r["seed"]): r["val"] for r in results if r["row"] == "fp"}
    ptq = {(r["regime"], r["seed"], r["quant"]): r["val"] for r in results if r["row"] == "ptq_mse"}
    groups: dict = {}
    for r in results:
        groups.setdefault((r["quant"], r["regime"], r["row"]), []).append(r)
    lines = [
        "| quant | regime | row | seeds | val loss mean (min..max) | recovery mean (min..max) | dprobe mean | changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (quant, regime, row), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], _order(kv[0][2]))
    ):
        vals = [r["val"] for r in rs]
        rec = []
        for r in rs:
            key = (r["regime"], r["seed"], r["quant"])
            if key in ptq and (r["regime"], r["seed"]) in fp and row != "fp":
                gap = ptq[key] - fp[(r["regime"], r["seed"])]
                rec.append(100 * (ptq[key] - r["val"]) / gap if gap > 0 else float("nan"))
        d = [
            (c["probe_after"] - c["probe_before"]) / c["probe_before"]
            for r in rs
            for c in r.get("recals", [])
            if not c.get("rolled_back")
        ]
        ch = [c["changed"] for r in rs for c in r.get("recals", [])]
        lines.append(
            f"| {quant} | {regime} | {row} | {len(rs)} | {statistics.mean(vals):.4f} ({min(vals):.4f}..{max(vals):.4f}) | "
            + (f"{statistics.mean(rec):.0f} % ({min(rec):.0f}..{max(rec):.0f})" if rec else "-")
            + (f" | {100 * statistics.mean(d):+.2f} % | " if d else " | - | ")
            + (f"{100 * statistics.mean(ch):.1f} % |" if ch else "- |")
        )
    return "\n".join(lines)


def _order(row: str) -> tuple:
    fixed = ["fp", "ptq_max", "ptq_mse", "ptq_act", "frozen", "act_init", "max_step", "modelopt"]
    return (fixed.index(row), "") if row in fixed else (len(fixed), row)


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--quant", nargs="+", default=["w4a4", "w4a16"], choices=["w4a4", "w4a16"])
    p.add_argument("--regimes", nargs="+", default=None, help="default: every regime of the size")
    p.add_argument("--seeds", nargs="+", type=int, default=[3, 4, 5])
    p.add_argument("--rows", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_ROWS)} (+modelopt)")
    p.add_argument("--workers", type=int, default=1, help="parallel (regime, seed) jobs (processes)")
    p.add_argument("--out", default=None, help="append the results here, one JSON line per row")
    p.add_argument("--table", nargs="+", default=None, help="only print the table of these JSON-lines files")
    args = p.parse_args()
    if args.table:
        results = [json.loads(line) for f in args.table for line in open(f) if line.strip()]
        print(table(results))
        return
    size = SIZES[args.size]
    regimes = args.regimes or list(size.regimes)
    rows = [r.replace("@E", f"@{size.every}") for r in (args.rows or [*DEFAULT_ROWS, "modelopt"])]
    for r in rows:
        if r not in ("frozen", "act_init", "max_step", "modelopt"):
            parse_row(r, size.every)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, nvfp4_qat {nvfp4_qat.__version__}, "
        f"device {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}",
        flush=True,
    )
    start = time.perf_counter()
    key = hashlib.sha1(repr(size).encode()).hexdigest()[:10]  # a changed size pretrains anew
    pre_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qat_quality_pretrain_{args.size}_{key}.pt")
    if not os.path.exists(pre_path):
        data = Data(load_tokens(size.max_chars), size, device)
        model = build_model(size, device)
        train(model, data, 0, size.pretrain_steps, size.pretrain_lr)
        torch.save(model.state_dict(), pre_path + ".tmp")
        os.replace(pre_path + ".tmp", pre_path)
        print(
            f"pretrained in {time.perf_counter() - start:.0f} s: val {evaluate(model, data.val):.4f}",
            flush=True,
        )
    threads = max(1, (os.cpu_count() or 2) // args.workers) if args.workers > 1 else 0
    pairs = [(reg, s) for reg in regimes for s in args.seeds]
    gpus = torch.cuda.device_count()
    jobs = [  # jobs spread over the GPUs of the machine, if several
        (
            args.size,
            reg,
            s,
            args.quant,
            rows,
            f"cuda:{i % gpus}" if gpus else "cpu",
            pre_path,
            threads,
            args.out,
        )
        for i, (reg, s) in enumerate(pairs)
    ]
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = [r for rs in pool.map(run_job, jobs, chunksize=1) for r in rs]
    else:
        results = [r for j in jobs for r in run_job(j)]
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
