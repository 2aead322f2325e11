"""Where ``recalibrate(model)`` spends its time: host phases and GPU kernels, from one profiled call.

The model is ``bench_recalibration.py``'s: the 224 linear weights of Llama-3-8B, bf16, on one GPU.
After three warm-up calls, seven unprofiled calls are timed (wall, device synchronized), then one
call runs under ``torch.profiler`` with the engine's phases marked (``resolve_plan``, ``full_weight``,
``stale_stats``, ``sweep``, ``install_kernel_states``, ``build_rows``). Printed: the wall times,
each phase's host span, the GPU time per kernel, and the GPU's busy time and idle gaps between the
first and the last kernel. The profiler slows the host (each launch is recorded), so host spans are
upper bounds; GPU times are not affected. Before it, five unprofiled calls stamp each phase's end on
the host and, with an event, on the GPU (a timeline without the profiler's cost). Run from the
repository root on a GPU machine::

    python benchmarks/profile_recalibration.py [--trace trace.json] [--host]

``--host`` also runs three calls under ``cProfile`` and prints the host functions that take the
most time (cProfile slows Python calls, not the C functions they reach: a guide, not a timing).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from bench_recalibration import LLAMA3_8B, build_model, print_versions, wall_times  # noqa: E402
from nvfp4_qat import recalibrate  # noqa: E402
from nvfp4_qat.quantize import nvfp4_layers  # noqa: E402
from nvfp4_qat.recalibration import engine  # noqa: E402

PHASES = ["resolve_plan", "full_weight", "stale_stats", "sweep", "install_kernel_states", "build_rows"]


def mark_phases() -> None:
    """Wrap the engine's phase functions in ``record_function`` ranges named ``phase:<name>``."""
    for name in PHASES:
        fn = getattr(engine, name)

        @functools.wraps(fn)
        def wrapped(*args, _fn=fn, _label=f"phase:{name}", **kwargs):
            with record_function(_label):
                return _fn(*args, **kwargs)

        setattr(engine, name, wrapped)


def timeline(model: torch.nn.Module, calls: int = 5) -> None:
    """Unprofiled calls with each phase's end stamped on the host (``perf_counter``) and on the GPU
    (an event recorded there): where the GPU reaches an event long after the host queued it, the
    GPU was busy; where it reaches it at once, it waited for the host. Medians over ``calls``."""
    n_layers = len(nvfp4_layers(model))
    stamps: list[tuple[str, float, torch.cuda.Event]] = []
    originals = {name: getattr(engine, name) for name in PHASES}
    for name, fn in originals.items():

        @functools.wraps(fn)
        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            out = _fn(*args, **kwargs)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            stamps.append((_name, time.perf_counter(), event))
            return out

        setattr(engine, name, wrapped)
    rows: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(calls):
            stamps.clear()
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            recalibrate(model)
            t_end = time.perf_counter()
            torch.cuda.synchronize()
            seen: dict[str, int] = {}
            for name, t, event in stamps:
                seen[name] = seen.get(name, 0) + 1
                if name != "full_weight" or seen[name] == n_layers:  # the last of the per-layer calls
                    rows.setdefault(name, []).append(((t - t0) * 1e3, start.elapsed_time(event)))
            rows.setdefault("(returned)", []).append(((t_end - t0) * 1e3, float("nan")))
    finally:
        for name, fn in originals.items():
            setattr(engine, name, fn)
    print(
        f"\nunprofiled phase ends, median of {calls} calls (ms from the call's start): host done, GPU reached"
    )
    for name, pairs in rows.items():
        host = statistics.median(h for h, _ in pairs)
        gpu = statistics.median(g for _, g in pairs)
        print(f"  {name:<24} host {host:8.3f}   gpu {gpu:8.3f}")


def host_profile(model: torch.nn.Module, calls: int = 3) -> None:
    """Three calls under ``cProfile``: the 25 functions with the most own time, and by cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        recalibrate(model)
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        print(f"\nhost functions under cProfile, {calls} calls, by {key}")
        pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", help="also write a Chrome trace to this path")
    parser.add_argument("--host", action="store_true", help="also profile the host side with cProfile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    print_versions(device)
    model = build_model(LLAMA3_8B, 32, device)
    walls = [t * 1e3 for t in wall_times(lambda: recalibrate(model), device, 7, warmup=3)]
    print(
        "recalibrate wall ms:", " ".join(f"{w:.2f}" for w in walls), f"median {statistics.median(walls):.2f}"
    )

    timeline(model)
    if args.host:
        host_profile(model)
    mark_phases()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("phase:all"):
            recalibrate(model)
        torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = prof.events()
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.name.startswith("phase:") and e.device_type == torch.autograd.DeviceType.CPU:
            spans.setdefault(e.name, []).append((e.time_range.start, e.time_range.end))
    t0 = spans["phase:all"][0][0]
    print("\nhost spans under the profiler (ms from the call's start)")
    for name, ranges in spans.items():
        total = sum(b - a for a, b in ranges) / 1e3
        print(
            f"  {name:<28} x{len(ranges):<4} {total:8.3f} ms   +{(ranges[0][0] - t0) / 1e3:7.3f} .. +{(ranges[-1][1] - t0) / 1e3:7.3f}"
        )
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.name.startswith("phase:")), key=lambda e: e.time_range.start)  # fmt: skip
    per_name: dict[str, list[float]] = {}
    for e in kernels:
        per_name.setdefault(e.name[:60], []).append((e.time_range.end - e.time_range.start) / 1e3)
    print("\nGPU time per kernel (ms)")
    for name, times in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"  {name:<60} x{len(times):<4} {sum(times):8.3f}")
    busy, gaps, last = 0.0, [], None
    for e in kernels:
        a, b = e.time_range.start, e.time_range.end
        if last is not None and a > last:
            gaps.append((a - last, a - t0))
        busy += max(0.0, b - max(a, last if last is not None else a))
        last = b if last is None else max(last, b)
    print(f"\nGPU: first kernel at +{(kernels[0].time_range.start - t0) / 1e3:.3f} ms, last ends at "
          f"+{(last - t0) / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, idle {sum(g for g, _ in gaps) / 1e3:.3f} ms "
          f"in {len(gaps)} gaps")  # fmt: skip
    for gap, at in sorted(gaps, reverse=True)[:5]:
        print(f"  gap {gap / 1e3:.3f} ms at +{at / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
