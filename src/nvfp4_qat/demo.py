"""A 10-second demo: calibrate one random weight with max scales and with the MSE sweep.

Run ``python -m nvfp4_qat.demo``; prints the weight MSE of both calibrations.
"""

from __future__ import annotations

import argparse
import time

import torch

from nvfp4_qat import fake_quantize_nvfp4, nvfp4_scale_sweep
from nvfp4_qat.format import block_codes, global_scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    w = (torch.randn(args.rows, args.cols, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16)
    global_amax = w.float().abs().amax()
    max_amax = w.float().abs().reshape(-1, 16).amax(dim=1)

    start = time.perf_counter()
    mse_amax = nvfp4_scale_sweep(w, global_amax, backend=args.backend)
    seconds = time.perf_counter() - start

    def mse(block_amax: torch.Tensor) -> float:
        return float((fake_quantize_nvfp4(w.float(), block_amax, global_amax) - w.float()).pow(2).mean())

    before, after = mse(max_amax), mse(mse_amax)
    s2 = global_scale(global_amax)
    changed = float((block_codes(mse_amax, s2) != block_codes(max_amax, s2)).float().mean())
    print(f"weight {args.rows}x{args.cols} bf16 on {device}, {w.numel() // 16} blocks of 16")
    print(f"  max calibration   weight MSE {before:.4e}")
    print(f"  MSE sweep         weight MSE {after:.4e}  ({100 * (1 - after / before):.1f}% lower)")
    print(f"  blocks whose FP8 scale code moved: {100 * changed:.1f}%   sweep time {seconds:.2f} s")


if __name__ == "__main__":
    main()
