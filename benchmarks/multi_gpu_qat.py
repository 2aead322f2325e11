"""Multi-GPU validation of NVFP4 QAT with ``NVFP4Recalibration``: DDP and FSDP2 (issue 8).

Trains a decoder-only transformer LM (random init, ~1.06B parameters by default; ``--tiny`` for a
CPU smoke run) on synthetic arithmetic token sequences with QAT and the recalibration callback,
under (a) ``DDPStrategy`` and (b) FSDP2: Lightning's ``ModelParallelStrategy`` with ``fully_shard``
applied per block in ``configure_model``. It reports:

1. after every recalibration: the scale buffers are identical on all ranks (rank 0's are broadcast
   and compared with ``torch.equal``), and equal a single-process sweep of the full weight
   (``full_weight()`` gathers FSDP2 shards, then ``nvfp4_scale_sweep``; ``torch.equal``);
2. recalibration wall time (slowest rank) on 1 device vs N devices, for
   ``recalibrate(model, distributed=False)`` on every rank (replicated work; FSDP2 weights gathered)
   and for ``recalibrate_distributed`` (= ``recalibrate`` under a process group: each rank sweeps a
   share, what the callback runs under DDP and FSDP2), plus the times seen inside training, and the
   reliability checks (a NaN weight on one rank, diverged replicas: every rank raises);
3. training throughput (tokens/s) without QAT, with QAT (callback calibrates at fit start only),
   and with QAT and a recalibration every ``--recal-every`` steps;
4. resume: a run restored from its mid-run checkpoint (end of epoch 0) ends with the same scales,
   weights and recalibration steps as the uninterrupted run.

Launch with ``torchrun`` (one process per device); the script creates the process group itself
(NCCL on GPUs, gloo on the CPU, as Lightning would) and Lightning reuses it::

    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu_qat.py --strategies ddp --out ddp.json
    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu_qat.py --strategies fsdp2 --out fsdp2.json
    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu_qat.py --tiny --accelerator cpu

Prints versions first and one results table at the end; ``--out`` writes the results as JSON
(rewritten after every part). Exits with status 1 if any check fails.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off on the lent machines; set before torch.distributed starts.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
# cuBLAS reproducibility for the resume comparison; must be set before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import nvfp4_qat  # noqa: E402
from nvfp4_qat import (
    recalibrate,  # noqa: E402
    recalibrate_distributed,  # noqa: E402
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _multi_gpu_runs import PRESETS, run_check_and_resume, run_throughput, timing_model  # noqa: E402


def init_distributed(accelerator: str) -> None:
    """The default process group, from torchrun's variables (or a 1-process group on 127.0.0.1)."""
    if "RANK" not in os.environ:  # plain `python multi_gpu_qat.py`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", NODE_RANK="0")
    if accelerator == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    else:
        dist.init_process_group("gloo")


def print_versions(args: argparse.Namespace) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    world = dist.get_world_size()
    if args.accelerator == "cuda":
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        gpu = f"{world} x {torch.cuda.get_device_name()} (NCCL {nccl})"
    else:
        gpu = f"none: {world} CPU processes, gloo (CPU: {platform.processor() or 'unknown'})"
    env = {
        "devices": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "lightning": lightning.__version__,
        "nvfp4_qat": nvfp4_qat.__version__,
        "world_size": world,
        "backend": dist.get_backend(),
        "nvls_env": {
            k: os.environ[k]
            for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
        },
    }
    if dist.get_rank() == 0:
        print(f"devices: {env['devices']}")
        print(f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), triton {triton_version}, "
              f"lightning {env['lightning']}, nvfp4_qat {env['nvfp4_qat']}, backend {env['backend']}")  # fmt: skip
        print(f"NVLS off: {env['nvls_env']}", flush=True)
    return env


def _timed(fn, device: torch.device, reps: int, ranks: str = "all") -> float:
    """Median over ``reps`` of the slowest rank's wall seconds (``ranks="zero"``: rank 0 alone)."""
    times = []
    for _ in range(reps):
        dist.barrier()
        t = torch.zeros((), dtype=torch.float64, device=device)
        if ranks == "all" or dist.get_rank() == 0:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            t += time.perf_counter() - start
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scales(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if n.endswith(("block_amax", "global_amax"))]


def run_timing(args: argparse.Namespace, device: torch.device) -> dict:
    """Recalibration wall time: 1 vs N devices, replicated (plain recalibrate) vs split (the callback)."""
    out: dict = {"reps": args.reps}
    for layout in ("ddp", "fsdp2"):
        model = timing_model(args, device, layout == "fsdp2")
        recalibrate(model, distributed=False)  # warm-up: kernel compilation
        execution = recalibrate_distributed(model).execution  # e.g. distributed-fused
        replicated = _timed(lambda m=model: recalibrate(m, distributed=False), device, args.reps)
        expected = _scales(model)
        split = _timed(lambda m=model: recalibrate_distributed(m), device, args.reps)
        for name, b in model.named_buffers():  # the split must rewrite every scale, not keep them
            if name.endswith("amax"):
                b.zero_()
        recalibrate_distributed(model)
        same = all(torch.equal(a, b) for a, b in zip(expected, _scales(model), strict=True))
        flag = torch.tensor(int(same), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        out[layout] = {
            "replicated_s": replicated,
            "split_s": split,
            "split_equals_replicated": bool(flag),
            "execution": execution,
        }
        if args.profile:
            _profile(args.profile, f"{layout}_split", lambda m=model: recalibrate_distributed(m), device)
        out[layout]["reliability"] = _reliability(model)
        if layout == "ddp":  # the same full model, swept by rank 0 alone: the 1-device time
            out["one_device_s"] = _timed(
                lambda m=model: recalibrate(m, distributed=False), device, args.reps, ranks="zero"
            )
            if args.profile and dist.get_rank() == 0:
                _profile(
                    args.profile, "one_device", lambda m=model: recalibrate(m, distributed=False), device
                )
        del model
        gc.collect()
    out["n_weights_swept"] = sum(
        m.weight.numel() for m in timing_model(args, "meta", False).modules()
        if isinstance(m, nvfp4_qat.NVFP4Linear)
    )  # fmt: skip
    return out


def _profile(directory: str, name: str, fn, device: torch.device) -> None:
    """One call of ``fn`` under ``torch.profiler``; rank 0 writes the op table (by self CPU time and
    by device time) to ``directory/profile_<name>.txt``: where a recalibration's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - start
    if dist.get_rank() == 0:
        table = prof.key_averages()
        text = [f"{name}: wall {wall * 1e3:.3f} ms (under the profiler)"]
        text.append(table.table(sort_by="self_cpu_time_total", row_limit=30))
        if device.type == "cuda":
            text.append(table.table(sort_by="self_device_time_total", row_limit=20))
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"profile_{name}.txt").write_text("\n".join(text))


def _reliability(model: torch.nn.Module) -> dict:
    """The promises under the real backend: a NaN weight on rank 1 only makes every rank raise a
    ValueError (none hangs, nothing written), and (replicated layout) weights changed on rank 1 only
    make every rank raise a RuntimeError. Each rank records what it saw; all must agree."""
    layers = [m for m in model.modules() if isinstance(m, nvfp4_qat.NVFP4Linear)]
    out = {}
    cases = [("nan_on_rank_1", lambda w: w.view(-1)[:1].fill_(float("nan")))]
    if not hasattr(layers[-1].weight, "full_tensor"):  # replicas only: FSDP2 holds no replica
        cases.append(("diverged_on_rank_1", lambda w: w.mul_(1.0 + 2.0**-7)))
    for name, spoil in cases:
        target = layers[-1].weight
        local = target.to_local() if hasattr(target, "to_local") else target
        kept, before = local.detach().clone(), _scales(model)
        with torch.no_grad():
            if dist.get_rank() == 1 and local.numel():
                spoil(local)
        try:
            recalibrate(model)
            got = "returned"
        except (ValueError, RuntimeError) as err:
            got = type(err).__name__
        unchanged = all(torch.equal(a, b) for a, b in zip(before, _scales(model), strict=True))
        with torch.no_grad():
            local.copy_(kept)
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (got, unchanged))
        want = "ValueError" if name.startswith("nan") else "RuntimeError"
        out[name] = {"per_rank": seen, "ok": all(g == want and u for g, u in seen)}
    return out


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def table(results: dict) -> tuple[list[tuple[str, str, str]], bool]:
    """``(rows, all checks passed)`` of the final table."""
    rows, ok = [], True
    for name in ("ddp", "fsdp2", "timing"):
        r = results.get(name)
        if not r:
            continue

        def add(item: str, value: str, part: str = name) -> None:
            rows.append((part, item, value))

        if "checks" in r:
            c, s = r["checks"], r["resume"]
            ranks, sweep = all(x["ranks_equal"] for x in c), all(x["sweep_equal"] for x in c)
            across = sum(x["elements_differing_across_ranks"] for x in c)
            differ = sum(x["blocks_differing_from_sweep"] for x in c)
            for run in ("uninterrupted", "resumed"):
                add(
                    f"recalibrations checked, {run} run: steps",
                    ", ".join(str(x["step"]) for x in c if x["run"] == run),
                )
            add("scales identical on all ranks after each one", f"{_yes(ranks)} ({across} values differ)")
            add("scales == 1-process sweep of the full weight", f"{_yes(sweep)} ({differ} scales differ)")
            add(f"resumed at step {s['resume_step']}: final scales == uninterrupted", _yes(s["scales_equal"]))
            add("resumed: final weights == uninterrupted", _yes(s["weights_equal"]))
            add("resumed: recalibration steps == uninterrupted", _yes(s["recal_steps_equal"]))
            add("recalibration metrics logged (CSV) at steps", ", ".join(map(str, r["logged_recal_steps"])))
            secs = [h["seconds"] for h in r["history"][1:]] or [r["history"][0]["seconds"]]
            add("recalibration inside training (callback, median)", _fmt_s(statistics.median(secs)))
            add("training loss at the end", f"{r['final_loss']:.3f}")
            # Logged on the row of val/loss of the same point: after optimizer step n at n - 1
            # (nvfp4_qat._feedback.logger_step), at n at fit start and epoch ends.
            expected = [max(h["step"] - 1, 0) if h["reason"] == "step" else h["step"] for h in r["history"]]
            logged = r["logged_recal_steps"] == expected
            ok &= ranks and sweep and bool(c) and s["scales_equal"] and s["recal_steps_equal"] and logged
        for label, t in r.get("throughput", {}).items():
            add(
                f"throughput: {label}",
                f"{t['tokens_per_s']:,.0f} tok/s ({t['median_step_ms']:.1f} ms/step median)",
            )
        if name == "timing":
            n = results["env"]["world_size"]
            add(f"recalibrate, 1 device ({r['n_weights_swept']:,} weights)", _fmt_s(r["one_device_s"]))
            for layout in ("ddp", "fsdp2"):
                x = r[layout]
                add(
                    f"{layout} layout, {n} devices: replicated (recalibrate(distributed=False) on every rank)",
                    _fmt_s(x["replicated_s"]),
                )
                add(
                    f"{layout} layout, {n} devices: split ({x['execution']})",
                    f"{_fmt_s(x['split_s'])} ({x['split_s'] / r['one_device_s']:.2f}x the 1-device time)",
                )
                add(f"{layout} layout: split scales == replicated scales", _yes(x["split_equals_replicated"]))
                ok &= x["split_equals_replicated"]
                for case, v in x.get("reliability", {}).items():
                    seen = ", ".join(f"{g}{'' if u else ' (scales changed!)'}" for g, u in v["per_rank"])
                    add(
                        f"{layout} layout: {case.replace('_', ' ')}: every rank raised",
                        f"{_yes(v['ok'])} ({seen})",
                    )
                    ok &= v["ok"]
    return rows, ok


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps (CPU smoke run)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size (default: 1b, or tiny with --tiny)")
    p.add_argument("--accelerator", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--strategies", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2")
    p.add_argument(
        "--parts",
        default="check,throughput,timing",
        help="comma-separated: check (incl. resume), throughput, timing",
    )
    p.add_argument("--steps", type=int, help="steps of the uninterrupted run; the checkpoint is at half")
    p.add_argument("--recal-every", type=int, help="recalibrate every n optimizer steps")
    p.add_argument("--throughput-steps", type=int, help="measured steps per throughput run")
    p.add_argument("--warmup-steps", type=int, help="unmeasured steps before those")
    p.add_argument("--micro-batch", type=int, help="sequences per device per step")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each recalibration timing")
    p.add_argument("--precision", help="Lightning precision (default bf16-mixed on cuda, 32-true on cpu)")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="do not ask for deterministic algorithms (and math attention) in the check runs")  # fmt: skip
    p.add_argument(
        "--workdir", default="multi_gpu_qat_runs", help="checkpoints and logs (same host for all ranks)"
    )
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--profile", metavar="DIR",
                   help="timing part: also profile one 1-device and one split recalibration (torch.profiler, "
                   "rank 0) and write the op tables to DIR")  # fmt: skip
    args = p.parse_args(argv)
    args.accelerator = args.accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("tiny" if args.tiny else "1b")
    small = args.preset == "tiny"
    defaults = {"steps": 8 if small else 100, "recal_every": 2 if small else 25, "throughput_steps": 6 if small else 50,
                "warmup_steps": 2 if small else 10, "micro_batch": 4 if small else 8}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "cuda" else "32-true")
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.parts = [s for s in args.parts.split(",") if s]
    for s in args.strategies:
        if s not in ("ddp", "fsdp2"):
            p.error(f"--strategies: expected ddp and/or fsdp2, got {s!r}")
    for s in args.parts:
        if s not in ("check", "throughput", "timing"):
            p.error(f"--parts: expected check, throughput and/or timing, got {s!r}")
    if args.steps % 2 or args.steps < 2 or (args.steps // 2) % args.recal_every:
        p.error(
            "--steps must be even and its half a multiple of --recal-every (the checkpoint lands on a recalibration)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_distributed(args.accelerator)
    rank = dist.get_rank()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if args.accelerator == "cuda"
        else torch.device("cpu")
    )
    results: dict = {"env": print_versions(args), "args": {k: v for k, v in vars(args).items()}}
    workdir = Path(args.workdir).absolute()

    def save() -> None:
        if args.out and rank == 0:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    for name in args.strategies:
        results[name] = {}
        if "check" in args.parts:
            results[name].update(run_check_and_resume(args, name, device, workdir / name))
            save()
        if "throughput" in args.parts:
            results[name]["throughput"] = run_throughput(args, name, device, workdir / name)
            save()
    if "timing" in args.parts:
        results["timing"] = run_timing(args, device)
        save()
    rows, ok = table(results)
    if rank == 0:
        width = max([len(r[1]) for r in rows] + [10])
        print(f"\n{'':-<{width + 40}}\n{'part':<7} {'item':<{width}} result\n{'':-<{width + 40}}")
        for part, item, value in rows:
            print(f"{part:<7} {item:<{width}} {value}")
        print(f"{'':-<{width + 40}}\nall checks passed: {_yes(ok)}", flush=True)
        if not args.keep_checkpoints:
            shutil.rmtree(workdir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
