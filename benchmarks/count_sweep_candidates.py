"""CPU proxy for the pruned sweep's work: candidate codes scored per block (no GPU needed).

The pruned kernel is compute-bound, so its cost is about the number of (block, code) scorings.
For a weight this prints (1) where the optimum lies relative to ``k0`` (the first non-saturating
code), (2) how many codes of the window an *oracle* lower bound could exclude (the exact squared
errors of the block's t largest elements, compared with the true optimum: no cheaper exact bound
can do better with those elements), and (3) the kernel's own count, simulated tile by tile (a tile
scores an extra code when any of its blocks needs it) for the saturation bound it uses (max element
only) and for the tighter clipped-sum bound ``sum_i max(0, |w_i| - 6 v s2)^2``::

    PYTHONPATH=src python benchmarks/count_sweep_candidates.py --shape 2048x4096

Losses come from the reference's arithmetic (all 126 codes per block), so the counts are exact.
"""

from __future__ import annotations

import argparse
import time

import torch

from nvfp4_qat._sweep_reference import _interval_tables, pairwise_block_sum
from nvfp4_qat.format import fp8_code_values, global_scale
from nvfp4_qat.kernels.sweep import FIRST_DOUBLING

V = fp8_code_values()
CHUNK = 32768


def weight(name: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 0.02
    if name == "student-t3":
        x = torch.distributions.StudentT(3.0).sample(shape) * 0.02
    elif name == "row-scaled":  # per-row scales spread over ~e^+-2
        x = x * torch.exp(torch.randn(shape[0], 1, generator=gen))
    elif name == "outliers":  # the tests' random_weight: every 97th element x30
        x.view(-1)[::97] *= 30
    return x.bfloat16()


def element_errors(absw: torch.Tensor, s2: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Squared error of each element at each code, ``[n, 16]`` x ``[n, K]`` -> ``[n, 16, K]``."""
    bounds, q_table = _interval_tables(absw.device)
    interval = torch.searchsorted(bounds, absw / s2)
    q = q_table[interval[:, :, None], codes[:, None, :]]
    return (absw[:, :, None] - q * (V[codes] * s2)[:, None, :]) ** 2


def all_losses(absw: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, absw.shape[0], CHUNK):
        codes = torch.arange(126).expand(min(CHUNK, absw.shape[0] - i), -1)
        out.append(pairwise_block_sum(element_errors(absw[i : i + CHUNK], s2, codes), dim=1))
    return torch.cat(out)


def simulate(absw, s2, k0, losses, n_below, n_extra, bound, tile):
    """Mean codes scored per block in the first pass, and the fraction flagged for the second."""
    n = absw.shape[0]
    m = absw.amax(1)
    width = n_below + 8
    start = (k0 - n_below).clamp(0, 126 - width)
    window = losses.gather(1, start[:, None] + torch.arange(width))
    best = window.amin(1)

    def fails(st, best):  # the bound for every code below st does not beat best yet
        s = V[(st - 1).clamp(min=0)] * s2
        if bound == "max":
            lb = (m - 6 * s).clamp(min=0) ** 2
        else:
            lb = ((absw - 6 * s[:, None]).clamp(min=0) ** 2).sum(1) * (1 - 2**-20)
        return (st > 0) & ~(lb > best)

    f = fails(start, best)
    n_tiles = -(-n // tile)
    steps = torch.zeros(n_tiles)
    for _ in range(n_extra):
        tile_on = torch.nn.functional.pad(f.float(), (0, n_tiles * tile - n)).view(n_tiles, tile).amax(1) > 0
        steps += tile_on.float()
        on = tile_on.repeat_interleave(tile)[:n]
        start = torch.where(on, (start - 1).clamp(min=0), start)
        loss = losses.gather(1, start[:, None])[:, 0]
        best = torch.where(on & f & (loss <= best), loss, best)
        f = torch.where(on, fails(start, best), f)
    flagged = f | ((k0 < FIRST_DOUBLING) & (m > 0))
    return width + float(steps.mean()) * 1.0, float(flagged.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2048x4096")
    p.add_argument("--weights", default="normal,student-t3,row-scaled,outliers")
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    torch.manual_seed(0)
    for name in args.weights.split(","):
        t0 = time.time()
        x = weight(name, shape)
        g = x.float().abs().amax()
        s2 = global_scale(g)
        absw = x.reshape(-1, 16).float().abs()
        losses = all_losses(absw, s2)
        best_k = losses.argmin(1)
        best = losses.gather(1, best_k[:, None])[:, 0]
        k0 = torch.searchsorted(6 * V, absw.amax(1) / s2)
        n = absw.shape[0]
        print(f"== {name} {shape[0]}x{shape[1]} bf16, {n} blocks")
        off, cnt = torch.unique(best_k - k0, return_counts=True)
        print(
            "  optimum at k0 + j, % of blocks: "
            + ", ".join(f"{int(o)}: {100 * int(c) / n:.3f}" for o, c in zip(off, cnt, strict=True))
        )
        # Oracle lower bounds over the codes k0-8 .. k0+7 (the rest is excluded by the doubling
        # argument and the saturation bound): codes not excluded even knowing the optimum's loss.
        codes = (k0[:, None] + torch.arange(-8, 8)).clamp(0, 125)
        order = absw.argsort(1, descending=True)
        for t in (1, 2, 4, 8):
            left = torch.zeros(n)
            for i in range(0, n, CHUNK):
                e = element_errors(absw[i : i + CHUNK], s2, codes[i : i + CHUNK])
                top = order[i : i + CHUNK, :t]
                lb = e.gather(1, top[:, :, None].expand(-1, -1, 16)).sum(1) * (1 - 2**-20)
                left[i : i + CHUNK] = (lb <= best[i : i + CHUNK, None]).sum(1).float()
            print(
                f"  oracle bound from the {t} largest elements: {left.mean():.2f} codes left per block "
                f"(p50 {left.median():.0f}, p99 {left.quantile(0.99):.0f})"
            )
        for n_below, n_extra, bound in [(3, 2, "max"), (3, 0, "max"), (3, 2, "clip"), (2, 2, "clip")]:
            res = []
            for tile in (32, 64, 128):
                ev, fl = simulate(absw, s2, k0, losses, n_below, n_extra, bound, tile)
                res.append(f"B{tile} {ev:.3f} (+{100 * fl:.3f}% flagged)")
            tag = "current" if (n_below, n_extra, bound) == (3, 2, "max") else ""
            print(
                f"  kernel N_BELOW={n_below} N_EXTRA={n_extra} bound={bound} {tag}: codes/block "
                + ", ".join(res)
            )
        print(f"  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
