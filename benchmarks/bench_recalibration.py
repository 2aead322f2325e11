"""Cost of ``recalibrate(model)`` (the whole report path) against the bare sweep kernel.

The model holds the 224 linear weights of Llama-3-8B (32 decoder layers of q 4096x4096, k/v
1024x4096, o 4096x4096, gate/up 14336x4096, down 4096x14336; bf16), allocated on the device layer by
layer and prepared with ``quantize_model`` (max init). Timed, each as the median of ``--repeats``
runs after one warm-up (kernel compilation or loading), with the device synchronized around
each run:

* the sweep kernels alone: ``launch_sweep(w, g)`` over the 224 weights, ``g`` precomputed, no
  statistics, and the public ``nvfp4_scale_sweep(w, g)``, which adds its value checks (``max |x|``
  on the device, one host read after the launch), and ``nvfp4_scale_sweep_ex(w, g)``, the same checks
  as device flags, read once after all 224 sweeps;
* ``recalibrate(model)``: on a GPU its fused path (``nvfp4_qat.recalibration._execute``): one stats
  launch over all weights (stale-scale error, max |w| -- NaN for a non-finite weight, which turns
  that layer's sweep into a no-op -- and sum w^2), then per layer the sweep with its FP8 bytes and
  losses written alongside the new scales, two small reductions, all queued without a host sync,
  then one sync and the rows;
* the pieces (for diagnosis): the fused path's stats launch, and the generic path's per-layer
  sweep with bytes and losses (what runs where the fused path does not apply).

Issue 5's target: ``recalibrate`` costs the kernel plus at most 20%. Run from the repository root::

    python benchmarks/bench_recalibration.py                # one GPU, about a minute
    python benchmarks/bench_recalibration.py --tiny         # CPU smoke run, small shapes

Prints versions first, then one table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import nvfp4_qat
from nvfp4_qat import nvfp4_scale_sweep, nvfp4_scale_sweep_ex, quantize_model, recalibrate
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.recalibration import _execute

#: out x in of one Llama-3-8B decoder layer's linear weights.
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
#: The same structure, 64x smaller per dim (in_features stay multiples of 16): a CPU smoke run.
TINY = {name: (out // 64, inp // 64) for name, (out, inp) in LLAMA3_8B.items()}


def build_model(shapes: dict[str, tuple[int, int]], n_layers: int, device: torch.device) -> nn.Module:
    """``n_layers`` decoder layers of bias-free bf16 linears (N(0, 0.02) weights), quantized."""
    gen = torch.Generator(device).manual_seed(0)
    layers = nn.ModuleList()
    for _ in range(n_layers):  # one layer at a time, straight on the device
        layer = nn.Module()
        for name, (out, inp) in shapes.items():
            linear = nn.Linear(inp, out, bias=False, device="meta", dtype=torch.bfloat16)
            w = torch.empty(out, inp, device=device, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            linear.weight = nn.Parameter(w)
            setattr(layer, name, linear)
        layers.append(layer)
    return quantize_model(layers, init_calibration="max")


def wall_times(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeats`` runs of ``fn`` after ``warmup`` runs, device synchronized."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after one warm-up, device synchronized."""
    return statistics.median(wall_times(fn, device, repeats))


def print_versions(device: torch.device) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"GPU: {props.name} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}")
    else:
        print(
            f"GPU: none, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
          f"nvfp4_qat {nvfp4_qat.__version__}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="shapes / 64 per dim, 2 layers, on the CPU")
    p.add_argument("--layers", type=int, help="decoder layers (default 32, or 2 with --tiny)")
    p.add_argument("--repeats", type=int, help="timed runs after the warm-up (default 5, or 3 with --tiny)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--method", default="pruned", choices=("pruned", "exhaustive"))
    p.add_argument("--device", help="default: cuda if available (and not --tiny), else cpu")
    p.add_argument("--no-bf16-pass", action="store_true",
                   help="sweep bf16 weights without the pruned kernel's bf16 pass (session 9's kernel)")  # fmt: skip
    p.add_argument("--stats-configs", action="store_true",
                   help="also time the stats pass over the weights with each tile in STATS_TRIALS")  # fmt: skip
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    shapes, n_layers = (TINY, args.layers or 2) if args.tiny else (LLAMA3_8B, args.layers or 32)
    args.repeats = args.repeats or (3 if args.tiny else 5)
    print_versions(device)
    if args.no_bf16_pass:  # launch_sweep and recalibration ask this function, at each call
        from nvfp4_qat.kernels import sweep as kernel_sweep

        kernel_sweep.words_pass = lambda *_: False
        print("bf16 pass off (--no-bf16-pass)")

    model = build_model(shapes, n_layers, device)
    layers = [m for _, m in nvfp4_layers(model)]
    weights = [m.weight.detach() for m in layers]
    amaxes = [torch.linalg.vector_norm(w, float("inf")).to(torch.float32) for w in weights]
    n = sum(w.numel() for w in weights)
    print(f"{len(layers)} linear weights, {n:,} elements, bf16, on {device}; backend={args.backend}, "
          f"method={args.method}; median of {args.repeats} after a warm-up\n")  # fmt: skip

    def sweep_only() -> None:
        if device.type != "cuda" or args.backend == "reference":
            from nvfp4_qat._sweep_reference import sweep_reference

            for w, g in zip(weights, amaxes, strict=True):
                sweep_reference(w, g, 16)
            return
        from nvfp4_qat.kernels.sweep import launch_sweep

        for w, g in zip(weights, amaxes, strict=True):
            launch_sweep(w, g, args.method)

    def sweep_public() -> None:
        for w, g in zip(weights, amaxes, strict=True):
            nvfp4_scale_sweep(w, g, backend=args.backend, method=args.method)

    def sweep_public_ex() -> None:  # the flags checked once, after all 224 sweeps
        infos = [nvfp4_scale_sweep_ex(w, g, backend=args.backend, method=args.method)[1]
                 for w, g in zip(weights, amaxes, strict=True)]  # fmt: skip
        if bool(torch.stack(infos).any()):
            raise SystemExit("nvfp4_scale_sweep_ex flagged a valid weight")

    tasks = [_execute.SweepTask(m, w) for m, w in zip(layers, weights, strict=True)]
    fused = device.type == "cuda" and args.backend != "reference"
    g_all = torch.stack(amaxes)

    def pass_stats() -> None:
        _execute.stale_stats(tasks, fused)  # fused: one launch per 32 weights

    def sweep_stats() -> None:
        backend = "triton" if fused else "reference"
        _execute.sweep(tasks, g_all, args.method, backend, fused=False)

    kernel = timed(sweep_only, device, args.repeats)
    full = timed(lambda: recalibrate(model, backend=args.backend, method=args.method), device, args.repeats)
    report = recalibrate(model, backend=args.backend, method=args.method)
    print(f"report of the last run: {len(report.layers)} layers, MSE {report.mse_before:.6e} -> "
          f"{report.mse_after:.6e}, changed {100 * report.changed_fraction:.2f}%, {report.seconds * 1e3:.1f} ms")  # fmt: skip
    rows = [
        ("sweep kernels alone (launch_sweep, g given)", kernel),
        ("public nvfp4_scale_sweep (+ finiteness check)", timed(sweep_public, device, args.repeats)),
        ("public nvfp4_scale_sweep_ex, flags read once", timed(sweep_public_ex, device, args.repeats)),
        ("recalibrate(model): the whole report path", full),
        ("  piece: stats pass (stale error, amax, energy)", timed(pass_stats, device, args.repeats)),
        ("  piece: generic path's sweep with bytes, losses", timed(sweep_stats, device, args.repeats)),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'median ms':>10}  {'vs kernel':>9}")
    print("-" * (width + 23))
    for label, seconds in rows:
        print(f"{label:<{width}}  {seconds * 1e3:>10.2f}  {100 * seconds / kernel:>8.1f}%")
    print("-" * (width + 23))
    print(f"recalibrate overhead over the kernel: {100 * (full - kernel) / kernel:+.1f}% (target: <= +20%)")
    if args.stats_configs and fused:
        stats_configs(tasks, device, args.repeats)


#: Stats-pass tiles timed by --stats-configs (ROWS blocks per tile, warps, TILES tiles per program).
STATS_TRIALS = [
    {"ROWS": 64, "num_warps": 2, "TILES": 8},
    {"ROWS": 64, "num_warps": 2, "TILES": 16},
    {"ROWS": 32, "num_warps": 1, "TILES": 16},
    {"ROWS": 128, "num_warps": 4, "TILES": 4},
    {"ROWS": 128, "num_warps": 2, "TILES": 4},
    {"ROWS": 64, "num_warps": 4, "TILES": 8},
    {"ROWS": 256, "num_warps": 4, "TILES": 2},
]


def stats_configs(tasks: list, device: torch.device, repeats: int) -> None:
    """The stats pass as recalibration runs it (one launch per STATS_CHUNK weights, the layers'
    cached kernel states), with each tile of STATS_TRIALS; sums checked against the default's."""
    from nvfp4_qat.kernels import fake_quant as fq

    chunks = [tasks[i : i + _execute.STATS_CHUNK] for i in range(0, len(tasks), _execute.STATS_CHUNK)]
    inputs = [([t.weight for t in c], [t.layer.kernel_state(t.weight) for t in c]) for c in chunks]

    def run(config):
        return [fq.stats_partials(xs, states, config) for xs, states in inputs]

    want = [fq.segment_totals(p, n, max_row=1) for p, n in run(fq.STATS_CONFIG)]
    print(f"\nstats pass over the {len(tasks)} weights by tile (median ms of {repeats}):")
    for config in STATS_TRIALS:
        got = [fq.segment_totals(p, n, max_row=1) for p, n in run(config)]
        same = all(
            torch.equal(a[:, 1], b[:, 1]) and torch.allclose(a, b, rtol=1e-5)
            for a, b in zip(got, want, strict=True)
        )
        ms = timed(lambda config=config: run(config), device, repeats) * 1e3
        print(f"  {config}  {ms:7.3f} ms  sums agree with the default's: {same}")


if __name__ == "__main__":
    main()
