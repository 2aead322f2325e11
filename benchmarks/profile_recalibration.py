"""Where ``recalibrate(model)`` spends its time: host phases and GPU kernels, from one profiled call.

The model is ``bench_recalibration.py``'s: the 224 linear weights of Llama-3-8B, bf16, on one GPU.
After three warm-up calls, seven unprofiled calls are timed (wall, device synchronized), then one
call runs under ``torch.profiler`` with the engine's phases marked (``resolve_plan``, ``full_weight``,
``stale_stats``, ``sweep``, ``install_kernel_states``, ``build_rows``). Printed: the wall times,
each phase's host span, the GPU time per kernel, and the GPU's busy time and idle gaps between the
first and the last kernel. The profiler slows the host (each launch is recorded), so host spans are
upper bounds; GPU times are not affected. Run from the repository root on a GPU machine::

    python benchmarks/profile_recalibration.py [--trace trace.json]
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
from bench_recalibration import LLAMA3_8B, build_model, print_versions  # noqa: E402
from nvfp4_qat import recalibrate  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", help="also write a Chrome trace to this path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    print_versions(device)
    model = build_model(LLAMA3_8B, 32, device)
    for _ in range(3):
        recalibrate(model)
    walls = []
    for _ in range(7):
        torch.cuda.synchronize()
        start = time.perf_counter()
        recalibrate(model)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    print(
        "recalibrate wall ms:", " ".join(f"{w:.2f}" for w in walls), f"median {statistics.median(walls):.2f}"
    )

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
