"""Benchmark of the NVFP4 scale sweep: reference, Triton exhaustive, Triton pruned, ModelOpt.

Run on a GPU machine from the repository root::

    python benchmarks/bench_sweep.py            # add --skip-llama for a 1-minute run
    python benchmarks/bench_sweep.py --configs  # only case (a): every tile config, pinned


Prints versions first, then one table: for each case (a) one 8192x4096 bf16 weight, (b) the 224
linear weights of a Llama-3-8B-shaped model, (c) one 256x4096 weight, the median time
(``triton.testing.do_bench``), blocks/s, peak extra memory, and how many blocks differ from our
reference and from ModelOpt's kernel, compared by the FP8 code each returned amax selects (ModelOpt's
amax for the same code can differ in the last bit). A differing block is a "near-tie" when the two
codes' losses (our definition) are within 1e-6 relative; the rest are counted as real differences.
ModelOpt rows appear when ``nvidia-modelopt`` imports; its reference calibrator runs with
``MODELOPT_NVFP4_TRITON_SWEEP=0`` (axis=0, quant_func=static_blockwise_fp4_fake_quant).
Before anything is timed, the first weight of each case is swept by the reference and by the Triton
kernels, and the run stops unless they are ``torch.equal``. "triton pruned kernel" is
``launch_sweep`` alone (no input validation, no host sync); "nvfp4_scale_sweep" is the public call.
``--configs`` times each tile config of ``_sweep_kernels.PRUNED_CONFIGS`` / ``EXHAUSTIVE_CONFIGS``
pinned on case (a) (the default is the first of each list), with the blocks sent to the
second pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import triton
import triton.testing

import nvfp4_qat
from nvfp4_qat import nvfp4_scale_sweep
from nvfp4_qat._sweep_reference import pairwise_block_sum, sweep_reference
from nvfp4_qat.format import block_codes, e2m1_magnitude, fp8_scale_candidates, global_scale
from nvfp4_qat.kernels import _sweep_kernels as K
from nvfp4_qat.kernels.sweep import launch_sweep, sweep_triton

LLAMA_SHAPES = {  # out x in of one Llama-3-8B decoder layer's linear weights
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}


def modelopt_api():
    """(kernel, reference) callables of ModelOpt, or None when it does not import."""
    try:
        from modelopt.torch.kernels.quantization.gemm import fp4_kernel
        from modelopt.torch.kernels.quantization.gemm.nvfp4_fp8_sweep import nvfp4_fp8_scale_sweep
        from modelopt.torch.quantization import extensions
        from modelopt.torch.quantization.calib.mse import NVFP4MSECalibrator
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"modelopt: not importable ({type(exc).__name__}: {exc})")
        return None
    # Its FP8 scale rounding has an eager fallback with the same numerics; building the CUDA
    # extension would take minutes of compile time.
    extensions.get_cuda_ext_fp8.extension = None
    from modelopt.torch.kernels.quantization.gemm._fp8_scale_candidates import fp8_scale_candidates as mo_c

    n = int((mo_c("cuda") != fp8_scale_candidates("cuda")).sum())
    print(f"modelopt candidate table (v / 448 on CUDA): {n} of 126 values differ from ours in the last bit")

    def reference(x, g):
        xb = x.reshape(-1, 16)
        cal = NVFP4MSECalibrator(
            amax=xb.float().abs().amax(dim=1),
            global_amax=g,
            axis=0,
            quant_func=lambda t, a: fp4_kernel.static_blockwise_fp4_fake_quant(t, a, g),
        )
        os.environ["MODELOPT_NVFP4_TRITON_SWEEP"] = "0"
        try:
            cal.collect(xb)
        finally:
            os.environ.pop("MODELOPT_NVFP4_TRITON_SWEEP")
        return cal.compute_amax().reshape(-1)

    return {"modelopt kernel": lambda x, g: nvfp4_fp8_scale_sweep(x, g, 16), "modelopt reference": reference}


def print_versions() -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, nvfp4_qat {nvfp4_qat.__version__}")
    try:
        import modelopt

        print(f"modelopt {modelopt.__version__}")
    except Exception:  # noqa: BLE001
        print("modelopt: not installed")


def codes_of(amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The FP8 code each block amax selects (ModelOpt's amax can differ from ours in the last bit
    for the same code: its candidate table divides by 448 through a reciprocal on CUDA)."""
    return block_codes(amax.reshape(-1), global_scale(g))


def block_losses_at(blocks: torch.Tensor, g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Our loss (the reference's arithmetic) of each block at FP8 code ``e`` (fp32 [n])."""
    s2 = global_scale(g)
    absw = blocks.float().abs()
    e = e.reshape(-1, 1)
    q = e2m1_magnitude(absw / s2, e) * (e * s2)
    return pairwise_block_sum((absw - q) ** 2)


def compare(xs, gs, a_list, b_list) -> tuple[int, int, int]:
    """(blocks whose chosen codes differ, of which not near-ties, blocks whose amax bits differ)."""
    differ = real = bits = 0
    for x, g, a, b in zip(xs, gs, a_list, b_list, strict=True):
        bits += int((a.reshape(-1) != b.reshape(-1)).sum())
        ca, cb = codes_of(a, g), codes_of(b, g)
        idx = torch.nonzero(ca != cb).flatten()
        differ += idx.numel()
        if idx.numel():
            blocks = x.reshape(-1, 16)[idx]
            la, lb = block_losses_at(blocks, g, ca[idx]), block_losses_at(blocks, g, cb[idx])
            rel = (la - lb).abs() / torch.maximum(la, lb).clamp(min=1e-30)
            real += int((rel > 1e-6).sum())
    return differ, real, bits


def measure(fn, xs, gs, slow: bool) -> tuple[float, float, list[torch.Tensor]]:
    """(median seconds for all weights, peak extra MiB, results)."""
    outs = [fn(x, g) for x, g in zip(xs, gs, strict=True)]  # warm-up: compile + autotune
    torch.cuda.synchronize()
    del outs
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outs = [fn(x, g) for x, g in zip(xs, gs, strict=True)]
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20

    def run_all():
        for x, g in zip(xs, gs, strict=True):
            fn(x, g)

    if slow:  # a handful of event-timed runs (do_bench would run a single one)
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_all()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
    else:
        ms = triton.testing.do_bench(run_all, warmup=100, rep=1000, return_mode="median")
    return ms / 1e3, peak, outs


def make_case(name: str, gen: torch.Generator) -> list[torch.Tensor]:
    if name.startswith("(a)"):
        shapes = [(8192, 4096)]
    elif name.startswith("(c)"):
        shapes = [(256, 4096)]
    else:
        shapes = [s for _ in range(32) for s in LLAMA_SHAPES.values()]
    return [torch.randn(s, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes]


def check_exact(x: torch.Tensor, g: torch.Tensor) -> None:
    """Stop unless both Triton methods (public call and bare launch) equal the reference."""
    ref = sweep_reference(x, g)
    for name, out in [
        ("nvfp4_scale_sweep pruned", nvfp4_scale_sweep(x, g)),
        ("launch_sweep pruned", launch_sweep(x, g, "pruned")[0]),
        ("launch_sweep exhaustive", launch_sweep(x, g, "exhaustive")[0]),
    ]:
        if not torch.equal(out, ref):
            raise SystemExit(f"{name}: {int((out != ref).sum())} blocks differ from the reference")
    print(f"  exact: both methods equal the reference on a {tuple(x.shape)} {x.dtype} weight")


def time_configs() -> None:
    """Case (a) with every tile config pinned: median ms of the bare launch, checked first."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 4096, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    g = x.float().abs().amax()
    ref = sweep_reference(x, g)
    cfgs = [("pruned", c) for c in K.PRUNED_CONFIGS] + [("exhaustive", c) for c in K.EXHAUSTIVE_CONFIGS]
    for method, cfg in cfgs:
        out, count, _ = launch_sweep(x, g, method, config=cfg)
        if not torch.equal(out, ref):
            raise SystemExit(f"{method} {cfg}: {int((out != ref).sum())} blocks differ from the reference")
        ms = triton.testing.do_bench(
            lambda m=method, c=cfg: launch_sweep(x, g, m, config=c),
            warmup=100,
            rep=1000,
            return_mode="median",
        )
        tag = " (default)" if cfg in (K.PRUNED_CONFIG, K.EXHAUSTIVE_CONFIG) else ""
        flagged = f", {int(count)} blocks to the second pass" if count is not None else ""
        print(
            f"  8192x4096 bf16 {method} BLOCK_B={cfg.kwargs['BLOCK_B']} warps={cfg.num_warps} "
            f"maxnreg={getattr(cfg, 'maxnreg', None)}{tag}: "
            f"{ms:.3f} ms{flagged}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-llama", action="store_true", help="skip case (b)")
    parser.add_argument("--configs", action="store_true", help="only time every tile config on case (a)")
    args = parser.parse_args()
    print_versions()
    if args.configs:
        time_configs()
        return
    mo = modelopt_api()
    methods = {
        "reference": lambda x, g: sweep_reference(x, g),
        "triton exhaustive": lambda x, g: sweep_triton(x, g, "exhaustive"),
        "triton pruned": lambda x, g: sweep_triton(x, g, "pruned"),
        "triton pruned kernel": lambda x, g: launch_sweep(x, g, "pruned")[0],
        "nvfp4_scale_sweep (pruned, validated)": lambda x, g: nvfp4_scale_sweep(x, g),
        **(mo or {}),
    }
    slow = {"reference", "modelopt reference"}
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = ["(a) 8192x4096", "(b) Llama-3-8B 224 weights", "(c) 256x4096"]
    rows = []
    for case in cases:
        if case.startswith("(b)") and args.skip_llama:
            continue
        xs = make_case(case, gen)
        gs = [x.float().abs().amax() for x in xs]
        check_exact(xs[0], gs[0])
        n_blocks = sum(x.numel() // 16 for x in xs)
        # The slow references run on one Llama layer (7 weights) and are scaled by 32.
        sub = 7 if case.startswith("(b)") else len(xs)
        results = {}
        for name, fn in methods.items():
            t0 = time.time()
            use = sub if name in slow else len(xs)
            sec, peak, outs = measure(fn, xs[:use], gs[:use], name in slow)
            scale = len(xs) / use
            results[name] = outs
            rows.append(
                [
                    case,
                    name + (" (1 layer x32)" if scale > 1 else ""),
                    sec * scale * 1e3,
                    n_blocks / (sec * scale),
                    peak,
                ]
            )
            print(f"  {case} {name}: {sec * scale * 1e3:.3f} ms (wall {time.time() - t0:.1f}s)", flush=True)
        _, count, _ = launch_sweep(xs[0], gs[0], "pruned")
        print(f"  {case} pruned: {int(count)} of {xs[0].numel() // 16} blocks of the first weight re-swept")
        for row in rows:
            if row[0] != case:
                continue
            name = row[1].split(" (1 layer")[0]
            n = sub if name in slow else len(xs)
            ref_n = min(n, sub) if "reference" in results else 0
            d_ref = compare(xs[:ref_n], gs[:ref_n], results[name][:ref_n], results["reference"][:ref_n])
            row.append(
                f"{d_ref[0]} ({d_ref[1]} real; {d_ref[2]} amax bits)"
                + (" 1 layer" if ref_n < len(xs) else "")
            )
            if mo:
                m_n = min(n, len(results["modelopt kernel"]))
                d_mo = compare(xs[:m_n], gs[:m_n], results[name][:m_n], results["modelopt kernel"][:m_n])
                row.append(f"{d_mo[0]} ({d_mo[1]} real)")
            else:
                row.append("n/a")
        del xs, results
        torch.cuda.empty_cache()

    header = [
        "case",
        "method",
        "median ms",
        "blocks/s",
        "peak extra MiB",
        "differ vs reference",
        "differ vs modelopt kernel",
    ]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for case, name, ms, bps, peak, d_ref, d_mo in rows:
        print(f"| {case} | {name} | {ms:.3f} | {bps:.3e} | {peak:.1f} | {d_ref} | {d_mo} |")


if __name__ == "__main__":
    main()
