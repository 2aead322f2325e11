"""Where the public ``nvfp4_scale_sweep`` call spends its time beyond the kernels (issue 17, item 1).

On one 8192x4096 bf16 weight (pruned method), on a GPU machine, from the repository root::

    python benchmarks/bench_public_call.py

Prints two tables:

* device time, ``triton.testing.do_bench`` medians (an L2 flush before each call, events around it):
  ``launch_sweep`` alone (what bench_sweep.py calls the kernel), the launch followed by a stream sync,
  the launch followed by the checks' read (``sweep._read_checks``: the one read of the public call), the same read as an
  async copy into page-locked memory and a stream sync, the public call, and
  ``nvfp4_scale_sweep_ex`` (the same checks returned as a device flag: no sync);
* host time, ``time.perf_counter`` medians over 300 calls, each started on an idle GPU: the public
  call's validation before the launch, the enqueue of ``launch_sweep`` (allocations and two Triton
  launches, no wait), one ``torch.zeros``, the bf16 pass's table (``sweep_tables``), one launch of the pruned kernel by Triton's own path
  (``kernel[grid]``) and by the package's (``kernels._launch.launch``), the checks' read on an idle GPU
  (the copy and sync latency), and the whole public call (host, kernel and read, back to back).

The run stops unless the public call equals the reference sweep.
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
import triton.testing

from nvfp4_qat import nvfp4_scale_sweep, nvfp4_scale_sweep_ex
from nvfp4_qat._backend import resolve_backend
from nvfp4_qat._sweep_reference import sweep_reference
from nvfp4_qat._validation import METHODS, check_choice, check_global_amax, check_x
from nvfp4_qat.kernels import _launch
from nvfp4_qat.kernels import sweep as ks
from nvfp4_qat.sweep import _read_checks


def host_median(fn, n: int = 300) -> float:
    """Median host seconds of ``fn()``, each call started with the GPU idle."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 4096, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    g = x.float().abs().amax()
    if not torch.equal(nvfp4_scale_sweep(x, g), sweep_reference(x, g)):
        raise SystemExit("the public call differs from the reference")
    out_ex, info = nvfp4_scale_sweep_ex(x, g)
    if int(info) != 0 or not torch.equal(out_ex, sweep_reference(x, g)):
        raise SystemExit("nvfp4_scale_sweep_ex differs from the reference or flags valid input")

    def launch():
        return ks.launch_sweep(x, g, "pruned")

    def launch_sync():
        launch()
        torch.cuda.current_stream().synchronize()

    def launch_read():
        _read_checks(ks.check_values(launch()[2][1]))

    pinned = torch.empty(ks.AMAX_SLOTS + 1, pin_memory=True)

    def launch_pinned():  # the same read into page-locked memory: an async copy, then a stream sync
        pinned.copy_(ks.check_values(launch()[2][1]), non_blocking=True)
        torch.cuda.current_stream().synchronize()
        pinned.tolist()

    def public():
        nvfp4_scale_sweep(x, g)

    def public_ex():
        nvfp4_scale_sweep_ex(x, g)

    print("\ndevice time (do_bench median, ms)")
    kernel_ms = None
    for name, fn in [("launch_sweep (kernel)", launch), ("launch + stream sync", launch_sync),
                     ("launch + checks read", launch_read), ("launch + pinned read", launch_pinned),
                     ("nvfp4_scale_sweep", public), ("nvfp4_scale_sweep_ex (no sync)", public_ex)]:  # fmt: skip
        ms = triton.testing.do_bench(fn, warmup=100, rep=1000, return_mode="median")
        kernel_ms = kernel_ms or ms
        print(f"  {name:<32} {ms:.4f}  ({(ms / kernel_ms - 1) * 100:+.1f} %)", flush=True)

    def validate():
        check_x(x, 16)
        check_choice("pruned", METHODS, "method")
        resolve_backend("auto", x.device, 16)
        check_global_amax(g, x.detach(), check_value=False)

    n = x.numel() // 16
    flat, (values, cands) = x.reshape(-1), ks._candidate_tables(x.device)
    out, codes = torch.empty(n, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    part = torch.zeros(ks.STATS_ROWS, ks.stats_slots(n), device="cuda")
    work, count = (
        torch.empty(n, dtype=torch.int32, device="cuda"),
        torch.zeros(1, dtype=torch.int32, device="cuda"),
    )
    g1 = g.reshape(1)

    words = ks.words_pass(flat, "pruned")  # as launch_sweep runs it: with the bf16 pass on sm_90
    cfg = ks._k.PRUNED_WORDS_CONFIG if words else ks._k.PRUNED_CONFIG
    table = ks.sweep_tables(g1) if words else values
    args = (flat, values, cands, g1, out, codes, codes, part, part.stride(0), work, count, n, table)
    kw = dict(NUM_CANDIDATES=126, FIRST_DOUBLING=ks.FIRST_DOUBLING, N_BELOW=ks.N_BELOW, N_EXTRA=ks.N_EXTRA,
              PACKED=True, WORDS=words, **cfg.all_kwargs(), enable_fp_fusion=False)  # fmt: skip
    kernel, grid = ks._k._sweep_pruned_kernel, (triton.cdiv(n, cfg.kwargs["BLOCK_B"]),)

    print("\nhost time (perf_counter median of 300, GPU idle at each start, us)")
    for name, fn in [("validation before the launch", validate), ("launch_sweep enqueue", launch),
                     ("one torch.zeros", lambda: torch.zeros(3, 4096, device="cuda")),
                     ("sweep_tables (bf16 pass)", lambda: ks.sweep_tables(g.reshape(1))),
                     ("pruned kernel, kernel[grid]", lambda: kernel[grid](*args, **kw)),
                     ("pruned kernel, _launch.launch", lambda: _launch.launch(kernel, grid, *args, **kw)),
                     ("checks read, GPU idle", lambda: _read_checks(ks.check_values(part))),
                     ("nvfp4_scale_sweep, whole", public)]:  # fmt: skip
        print(f"  {name:<30} {host_median(fn) * 1e6:8.1f}", flush=True)
    state = "off" if _launch._compiled is None else f"on, {len(_launch._compiled)} compiled kernels cached"
    print(f"direct launch path (kernels._launch): {state}")


if __name__ == "__main__":
    main()
