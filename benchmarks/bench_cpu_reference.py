"""Benchmark of the reference scale sweep on the CPU: time and peak RSS, idle or under load.

Each measurement runs in a fresh subprocess (so peak RSS is the sweep's own), with a given number
of torch threads, optionally while ``--load N`` busy-looping processes compete for the cores::

    python benchmarks/bench_cpu_reference.py                        # this checkout's reference
    python benchmarks/bench_cpu_reference.py --threads 1 2 --load 0 2
    git show 52e2dc7:src/nvfp4_qat/_sweep_reference.py > /tmp/old_ref.py
    python benchmarks/bench_cpu_reference.py --module /tmp/old_ref.py   # the candidate loop

Prints versions and the load average first, then per shape x threads x load the median time of
``--repeat`` calls (after one warm-up call; the large shape: ``--repeat // 5`` calls, no warm-up) and the peak RSS the call added over the process's RSS
before it (the input included in neither). ``--module`` loads ``sweep_reference`` from a file (it
may import ``nvfp4_qat.format``), e.g. an older version of the module.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = {"512x128": (512, 128), "2048x4096": (2048, 4096)}


def _child(args: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads[0])
    if args.module:
        spec = importlib.util.spec_from_file_location("ref_under_test", args.module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sweep = mod.sweep_reference
    else:
        from nvfp4_qat._sweep_reference import sweep_reference as sweep
    x = torch.randn(*SHAPES[args.shape], generator=torch.Generator().manual_seed(0))
    g = x.abs().max()
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * page
    warmup = 1 if x.numel() < 2**20 else 0  # the large shape: the calls are long enough
    times = []
    for _ in range(args.repeat + warmup):
        start = time.perf_counter()
        sweep(x, g)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"median_s": statistics.median(times[warmup:]), "extra_rss": peak - rss_before}))


def _burn() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--load", nargs="+", type=int, default=[0, 2], help="busy processes alongside")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--module", default="", help="file holding an alternative sweep_reference")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="512x128", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    import nvfp4_qat

    print(f"python {platform.python_version()}, torch {torch.__version__}, nvfp4_qat {nvfp4_qat.__version__}")
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()}, module {args.module or 'this checkout'}")
    print(f"{'shape':<10} {'threads':>7} {'load':>4} {'median s':>9} {'extra RSS MiB':>14}")
    import multiprocessing as mp

    for load in args.load:
        burners = [mp.Process(target=_burn, daemon=True) for _ in range(load)]
        for b in burners:
            b.start()
        try:
            for shape in args.shapes:
                for threads in args.threads:
                    repeat = args.repeat if shape == "512x128" else max(1, args.repeat // 5)
                    cmd = [sys.executable, __file__, "--child", "--shape", shape, "--threads", str(threads)]
                    cmd += ["--repeat", str(repeat)] + (["--module", args.module] if args.module else [])
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                    out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True).stdout)
                    print(
                        f"{shape:<10} {threads:>7} {load:>4} {out['median_s']:>9.3f} "
                        f"{out['extra_rss'] / 2**20:>14.1f}",
                        flush=True,
                    )
        finally:
            for b in burners:
                b.terminate()
                b.join()


if __name__ == "__main__":
    main()
