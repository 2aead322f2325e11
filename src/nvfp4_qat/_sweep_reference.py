"""Reference NVFP4 scale sweep in PyTorch: exhaustive, exact, bounded memory, any device.

For every block of 16 elements it tries the 126 FP8 E4M3 codes ``v`` and scores each with exactly
what :func:`nvfp4_qat.format.fake_quantize_nvfp4` produces for it::

    loss(v) = sum_i (|w_i| - q_v(u_i) * (v * s2))^2,   u_i = |w_i| / s2  (computed once)

The 16 squared errors are summed in one fixed order, a pairwise tree over adjacent pairs
(16 -> 8 -> 4 -> 2 -> 1), which the Triton kernels reproduce, so losses and the chosen scales are
bit-identical wherever they are computed. Candidates are visited in ascending order and a later one
replaces the best only when strictly smaller: the first minimum (the smallest code) wins.

Memory: the peer's reference materialises 126 fp32 losses per block. This one keeps a running
argmin and works in chunks of blocks sized so that its extra memory stays under
``max(2 * x.nbytes, 256 MiB)``.
"""

from __future__ import annotations

import torch

from nvfp4_qat.format import e2m1_magnitude, fp8_code_values, fp8_scale_candidates, global_scale

#: Floor of the extra-memory budget, bytes.
MEMORY_FLOOR_BYTES = 256 * 2**20
#: Upper bound on the temporaries per block of 16 inside one chunk: |w|, u, q, the fp32 tree, a
#: bool mask, the running argmin. Measured peak on CPU: 256 B (tests/test_sweep_reference.py);
#: 1.5x margin.
BYTES_PER_BLOCK = 384


def pairwise_block_sum(sq: torch.Tensor) -> torch.Tensor:
    """Sum the last dim by a pairwise tree over adjacent pairs; an odd tail carries upward.

    For 16 elements: ``((s0+s1)+(s2+s3)) + ...``, the order every implementation uses.
    """
    while sq.shape[-1] > 1:
        n = sq.shape[-1]
        paired = sq[..., 0 : n - 1 : 2] + sq[..., 1:n:2]
        sq = torch.cat([paired, sq[..., n - 1 :]], dim=-1) if n % 2 else paired
    return sq[..., 0]


def chunk_blocks(x: torch.Tensor, n_blocks: int, block_size: int) -> int:
    """Blocks per chunk so that the sweep's extra memory stays within its budget."""
    budget = max(2 * x.numel() * x.element_size(), MEMORY_FLOOR_BYTES)
    budget -= 8 * n_blocks  # the output and the fp32 view of it
    per_block = BYTES_PER_BLOCK * max(block_size, 16) // 16
    return max(1, min(n_blocks, budget // per_block))


def block_losses(absw: torch.Tensor, u: torch.Tensor, v: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Loss of every block at FP8 code value ``v`` (0-dim), fp32 ``[B]``.

    Args:
        absw: ``|w|`` in fp32, ``(B, block_size)``.
        u: ``|w| / s2``, ``(B, block_size)``.
        v: FP8 code value (0-dim fp32 tensor).
        s2: per-tensor scale (0-dim fp32 tensor).
    """
    q = e2m1_magnitude(u, v)  # (B, bs)
    q.mul_(v * s2)  # dequantized magnitude q * (v * s2)
    torch.sub(absw, q, out=q)
    q.mul_(q)
    return pairwise_block_sum(q)


def sweep_reference(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Exhaustive MSE sweep, returning the winning ``block_amax = (v / 448) * global_amax``.

    Inputs are assumed validated (see :func:`nvfp4_qat.nvfp4_scale_sweep`).

    Returns:
        fp32 tensor ``[n_blocks]`` on ``x``'s device.
    """
    n_blocks = x.numel() // block_size
    blocks = x.reshape(n_blocks, block_size)  # (n_blocks, bs), a view when x is contiguous
    s2 = global_scale(global_amax)
    values = fp8_code_values(x.device)  # [126]
    candidates = fp8_scale_candidates(x.device)  # [126] = values / 448
    g = global_amax.reshape(()).to(torch.float32)
    out = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    step = chunk_blocks(x, n_blocks, block_size)
    for start in range(0, n_blocks, step):
        absw = blocks[start : start + step].to(torch.float32).abs()  # (B, bs)
        u = absw / s2
        best = torch.full((absw.shape[0],), float("inf"), dtype=torch.float32, device=x.device)
        best_idx = torch.zeros(absw.shape[0], dtype=torch.int64, device=x.device)
        for k in range(values.numel()):
            loss = block_losses(absw, u, values[k], s2)
            better = loss < best  # strict: the first minimum wins
            best = torch.where(better, loss, best)
            best_idx.masked_fill_(better, k)
            del loss, better
        out[start : start + step] = candidates[best_idx] * g
        del absw, u, best, best_idx
    return out
