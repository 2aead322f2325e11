"""First-call cost of the scale sweep: compiling (cold) or loading (warm) the Triton kernels.

Each measurement is a fresh Python process, so nothing is cached in memory. For every repeat a new,
empty ``TRITON_CACHE_DIR`` is made; one process runs with it empty (cold: the kernels compile), then
a second process with the same directory (warm: the kernels load from the disk cache, as on every
run after the first on a machine). Each process times, with the device synchronized:

* ``sweep``: the first and the second ``nvfp4_scale_sweep(w, g)`` on one 8192x4096 bf16 weight
  (pruned, the default method) -- the first minus the second is what compiling/loading costs;
* ``recalibrate``: the first and the second ``recalibrate(model)`` on one Llama-3-8B decoder layer
  (q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 14336x4096, down 4096x14336; 4 distinct block
  counts, which mattered while the kernels were autotuned per block count).

CUDA initialisation and ``import nvfp4_qat`` are timed separately and excluded. For ``recalibrate`` the
table also shows the first call's ``report.compile_seconds`` (what its summary names from 1 s up;
NaN for the sweep, which returns a tensor). Issue 17's target:
first call <= 1 s more than a steady call with a warm cache. Run on a GPU machine from the
repository root::

    python benchmarks/bench_first_call.py --repeats 3 [--profile]

``--profile`` also prints, per case, the functions that take the most time in one warm first call
(cProfile in a third process on the same cache).

Prints versions first, then the medians. On a machine without CUDA it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import nvfp4_qat
from nvfp4_qat import nvfp4_scale_sweep, quantize_model, recalibrate
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
t_cuda = time.perf_counter() - t0
case = sys.argv[1]
gen = torch.Generator("cuda").manual_seed(0)
if case == "sweep":
    w = torch.empty(8192, 4096, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
    g = w.float().abs().amax()
    call = lambda: nvfp4_scale_sweep(w, g)
else:
    from torch import nn
    shapes = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
              "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
    layer = nn.Module()
    for name, (out, inp) in shapes.items():
        lin = nn.Linear(inp, out, bias=False, device="meta", dtype=torch.bfloat16)
        lin.weight = nn.Parameter(torch.empty(out, inp, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02, generator=gen))
        setattr(layer, name, lin)
    model = quantize_model(layer, init_calibration="max")
    call = lambda: recalibrate(model)
times, reported = [], []
profiler = None
if len(sys.argv) > 2:  # --profile: the first call under cProfile
    import cProfile
    profiler = cProfile.Profile()
for i in range(2):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if profiler is not None and i == 0:
        profiler.enable()
    out = call()
    if profiler is not None and i == 0:
        torch.cuda.synchronize()
        profiler.disable()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    reported.append(getattr(out, "compile_seconds", float("nan")))  # the report's own figure
if profiler is not None:
    import pstats
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=sys.stdout).sort_stats(key).print_stats(30)
print("RESULT " + json.dumps({"import": t_import, "cuda_init": t_cuda, "first": times[0], "second": times[1],
                              "reported": reported[0]}))
"""


def run_child(case: str, cache_dir: str, profile: bool = False) -> dict[str, float]:
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    argv = [sys.executable, "-c", CHILD, case] + (["profile"] if profile else [])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child process failed ({case}):\n{proc.stdout}\n{proc.stderr}")
    if profile:
        print(proc.stdout)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold/warm process pairs per case")
    parser.add_argument("--cases", default="sweep,recalibrate")
    parser.add_argument(
        "--profile", action="store_true", help="also run each case's warm first call once under cProfile"
    )
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_first_call.py measures compiled Triton kernels and needs a CUDA GPU; none found.")
    import triton

    import nvfp4_qat

    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, nvfp4_qat {nvfp4_qat.__version__}")
    print(f"python {sys.version.split()[0]}, nvfp4_qat from {os.path.dirname(nvfp4_qat.__file__)}")
    rows = []
    for case in args.cases.split(","):
        runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache_dir:
                t0 = time.perf_counter()
                runs["cold"].append(run_child(case, cache_dir))
                runs["warm"].append(run_child(case, cache_dir))
                print(f"  {case}: pair done in {time.perf_counter() - t0:.1f} s", flush=True)
                if args.profile and len(runs["warm"]) == 1:
                    print(f"  {case}: warm first call under cProfile (slower than unprofiled)")
                    run_child(case, cache_dir, profile=True)
        for state, results in runs.items():
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            overhead = statistics.median(r["first"] - r["second"] for r in results)
            rows.append(
                (
                    case,
                    state,
                    med["first"],
                    med["second"],
                    overhead,
                    med["reported"],
                    med["import"],
                    med["cuda_init"],
                )
            )
    print(f"\nmedians of {args.repeats} fresh processes each (seconds)")
    header = [
        "case",
        "Triton cache",
        "first call",
        "second call",
        "first - second",
        "report.compile_seconds",
        "import",
        "CUDA init",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for case, state, first, second, overhead, rep, imp, init in rows:
        print(
            f"| {case} | {state} | {first:.3f} | {second:.4f} | {overhead:.3f} | {rep:.3f} | {imp:.2f} | "
            f"{init:.2f} |"
        )


if __name__ == "__main__":
    main()
