"""NVFP4 numerics agreement on a GPU: CUDA vs CPU, and ours vs ModelOpt's fake-quant.

Run on a GPU machine from the repository root::

    python benchmarks/bench_numerics_agreement.py

For a random bf16 8192x4096 weight (``randn * 0.02``, seed 0) with max-calibrated scales (block
amax = max |w| per 16 elements, global amax = max |w|):

1. ``fake_quantize_nvfp4`` on CUDA vs on CPU: number of differing elements (bitwise; must be 0),
   and the reference ``nvfp4_scale_sweep`` on CUDA vs CPU on a 1024x4096 weight (must be equal).
2. ours vs ModelOpt's ``static_blockwise_fp4_fake_quant`` with the same amaxes: elements whose
   values disagree (and, apart, the zeros whose sign differs), and what each disagreement is. Our rule decides on ``u = |x| / s2`` against ``midpoint * e``;
   the textbook rule (ModelOpt's) rounds ``|x| / scale`` with an approximate division. Each
   disagreement is put in one category, from the exact quotient ``|x| / s2`` (float64):
   ``block scale differs`` (ModelOpt's FP8 block scale is not ``e * s2``), ``within 1/2 ulp``
   (``|x| / s2`` is within half an fp32 ulp of ``midpoint * e``: a midpoint case), ``within 2 ulps``
   (the reach of ModelOpt's approximate division), or ``unexplained``.
"""

from __future__ import annotations

import torch
import triton

import nvfp4_qat
from nvfp4_qat import fake_quantize_nvfp4, nvfp4_scale_sweep
from nvfp4_qat.format import E2M1_MIDPOINTS, block_codes, global_scale

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def differing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise inequality mask (so -0.0 != +0.0)."""
    return a.contiguous().view(INT_VIEW[a.dtype]) != b.contiguous().view(INT_VIEW[b.dtype])


def max_calibration(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float().abs()
    return xf.reshape(-1, 16).amax(dim=1), xf.amax()


def cuda_vs_cpu(x: torch.Tensor) -> None:
    block_amax, g = max_calibration(x)
    gpu = fake_quantize_nvfp4(x, block_amax, g)
    cpu = fake_quantize_nvfp4(x.cpu(), block_amax.cpu(), g.cpu())
    n = int(differing(gpu.cpu(), cpu).sum())
    print(
        f"fake_quantize_nvfp4 CUDA vs CPU ({x.numel():,} elements): {n} differ, equal={torch.equal(gpu.cpu(), cpu)}"
    )
    small = x[:1024]
    _, gs = max_calibration(small)
    ref_gpu = nvfp4_scale_sweep(small, gs, backend="reference")
    ref_cpu = nvfp4_scale_sweep(small.cpu(), gs.cpu(), backend="reference")
    n = int((ref_gpu.cpu() != ref_cpu).sum())
    print(
        f"nvfp4_scale_sweep reference CUDA vs CPU ({ref_cpu.numel():,} blocks): {n} differ, "
        f"equal={torch.equal(ref_gpu.cpu(), ref_cpu)}"
    )


def versus_modelopt(x: torch.Tensor) -> None:
    try:
        from modelopt.torch.kernels.quantization.gemm.fp4_kernel import (
            compute_fp4_scales,
            static_blockwise_fp4_fake_quant,
        )
        from modelopt.torch.quantization import extensions
    except Exception as exc:  # noqa: BLE001
        print(f"modelopt not importable ({type(exc).__name__}: {exc}); skipping the comparison")
        return
    extensions.get_cuda_ext_fp8.extension = None  # eager FP8 rounding, same numerics, no build
    block_amax, g = max_calibration(x)
    ours = fake_quantize_nvfp4(x, block_amax, g)
    theirs = static_blockwise_fp4_fake_quant(x, block_amax, g)
    # Compared by value: ModelOpt writes +0.0 where the sign rule gives -0.0 (counted apart).
    diff = (ours != theirs).reshape(-1, 16)
    signed_zero = int((differing(ours, theirs) & (ours == theirs)).sum())
    n_el, n_bl = int(diff.sum()), int(diff.any(dim=1).sum())
    per_block = diff.sum(dim=1)
    print(
        f"ours vs ModelOpt static_blockwise_fp4_fake_quant: {n_el:,} of {x.numel():,} elements differ "
        f"in value ({100 * n_el / x.numel():.4f} %) in {n_bl:,} blocks; blocks with >1 differing "
        f"element: {int((per_block > 1).sum())}; equal values with another sign of zero: {signed_zero:,}"
    )
    counts, largest = classify(x, block_amax, g, diff, compute_fp4_scales(block_amax, g).float())
    print("categories of the differing elements:")
    for name, n in counts.items():
        print(f"  {name:45s} {n:,}")
    print(f"  largest distance from a midpoint (ulps):     {largest:.3f}")


def classify(x, block_amax, g, diff, their_scale) -> tuple[dict[str, int], float]:
    """Put each differing element (``diff``: bool (n_blocks, 16)) in one category (module doc)."""
    s2 = global_scale(g)
    e = block_codes(block_amax, s2)  # (n_blocks,) FP8 code values
    blk, col = torch.nonzero(diff, as_tuple=True)
    scale_differs = their_scale.reshape(-1)[blk] != (e * s2)[blk]
    exact_q = x.reshape(-1, 16)[blk, col].double().abs() / s2.double()  # |x| / s2 in float64
    mids = torch.tensor([m for m, _ in E2M1_MIDPOINTS], dtype=torch.float64, device=x.device)
    targets = mids[None, :] * e[blk].double()[:, None]  # (n, 7), exact
    nearest = targets.gather(1, (exact_q[:, None] - targets).abs().argmin(1, keepdim=True))[:, 0]
    ulp = torch.finfo(torch.float32).eps * torch.exp2(
        torch.floor(torch.log2(nearest))
    )  # of the fp32 midpoint
    dist = (exact_q - nearest).abs() / ulp
    same = ~scale_differs
    counts = {
        "block scale differs": int(scale_differs.sum()),
        "|x|/s2 within 1/2 ulp of midpoint*e": int((same & (dist <= 0.5)).sum()),
        "|x|/s2 within (1/2, 2] ulps of midpoint*e": int((same & (dist > 0.5) & (dist <= 2)).sum()),
        "unexplained (> 2 ulps)": int((same & (dist > 2)).sum()),
    }
    largest = float(dist[same].max()) if bool(same.any()) else 0.0
    return counts, largest


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(
        f"GPU: {props.name}, CUDA {torch.version.cuda}, torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"nvfp4_qat {nvfp4_qat.__version__}")
    try:
        import modelopt

        print(f"modelopt {modelopt.__version__}")
    except Exception:  # noqa: BLE001
        pass
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 4096, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    cuda_vs_cpu(x)
    versus_modelopt(x)


if __name__ == "__main__":
    main()
