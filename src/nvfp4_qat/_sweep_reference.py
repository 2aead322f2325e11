"""Reference NVFP4 scale sweep in PyTorch: exhaustive, exact, bounded memory, any device.

For every block of 16 elements it tries the 126 FP8 E4M3 codes ``v`` and scores each with exactly
what :func:`nvfp4_qat.format.fake_quantize_nvfp4` produces for it::

    loss(v) = sum_i (|w_i| - q_v(u_i) * (v * s2))^2,   u_i = |w_i| / s2  (computed once)

The 16 squared errors are summed in one fixed order, a pairwise tree over adjacent pairs
(16 -> 8 -> 4 -> 2 -> 1), which the Triton kernels reproduce, so losses and the chosen scales are
bit-identical wherever they are computed. Ties go to the first minimum (the smallest code).

All 126 candidates are scored at once, in a handful of large tensor operations per chunk of
blocks (a Python loop over candidates made ~3,000 small operations per call, which thread
oversubscription on a busy CPU turned from a quarter second into half a minute). The shortcut
that makes this cheap is exact: ``u`` is compared only with the thresholds ``midpoint * v`` (exact
fp32 products, see :mod:`nvfp4_qat.format`), which do not depend on ``s2``. Sorting the distinct
thresholds of all codes gives 482 intervals; every ``u`` in one interval passes the same
thresholds under every code, so one ``searchsorted`` per element finds its row of a constant
table ``Q[interval, code]`` of E2M1 magnitudes. Per call, ``Q * (v * s2)`` is the dequantized
magnitude with the very rounding of :func:`~nvfp4_qat.format.fake_quantize_unchecked`; then one
gather, one subtraction, one square and the tree sum score all codes.

Memory: chunks of at most :data:`CHUNK_BLOCKS` blocks (about 3 MiB of temporaries, sized for a
CPU's cache), fewer when the extra-memory budget ``max(2 * x.nbytes, 256 MiB)`` demands it.
"""

from __future__ import annotations

import torch

from nvfp4_qat.format import (
    E2M1_MIDPOINTS,
    E2M1_VALUES,
    e2m1_magnitude,
    fp8_code_values,
    fp8_scale_candidates,
    global_scale,
)

#: Floor of the extra-memory budget, bytes.
MEMORY_FLOOR_BYTES = 256 * 2**20
#: Temporaries per block of 16 inside one chunk: the gathered ``[16, 126]`` fp32 losses and the
#: tree's first level (12 KiB), the interval index (128 B) and ``|w|``, ``u``. Measured peak on CPU:
#: 12.4 KiB (tests/test_sweep_reference.py); 1.3x margin.
BYTES_PER_BLOCK = 16 * 2**10
#: Blocks per chunk at most (3 MiB of temporaries). Timed on a busy 2-core CPU, one thread, 512x128
#: and 2048x4096 fp32: 256 was fastest (13 ms, 1.9 s), 128 and 512 within 15%, 1024 and 4096 spill
#: the cache and ran 1.5x slower.
CHUNK_BLOCKS = 256
#: CUDA has no cache to fit and pays per launch: there the memory budget alone sets the chunk.
CHUNK_BLOCKS_CUDA = 2**20

_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _interval_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bounds [P], Q [P + 1, 126])`` on ``device``, built once per device.

    ``bounds`` are the distinct thresholds, ascending, rewritten so that every comparison is strict:
    ``u >= t`` equals ``u > nextafter(t, -inf)`` for floats. ``searchsorted(bounds, u)`` is the
    number of bounds below ``u``; ``Q[p, k]`` the E2M1 magnitude at code ``k`` of any ``u`` with
    that count (a sum of the exact dyadic steps of the thresholds it passes).
    """
    if device not in _TABLES:
        values = fp8_code_values()  # [126]
        rows = []
        for mid, ties_down in E2M1_MIDPOINTS:
            t = values * mid  # exact
            rows.append(t if ties_down else torch.nextafter(t, torch.tensor(-torch.inf)))
        thresholds = torch.stack(rows)  # [7, 126]
        bounds = torch.unique(thresholds)  # [P], sorted
        # A representative of each interval: u passes threshold t iff t <= the interval's top bound.
        top = torch.cat([torch.tensor([-torch.inf]), bounds])  # [P + 1]
        steps = torch.tensor([b - a for a, b in zip(E2M1_VALUES[:-1], E2M1_VALUES[1:], strict=True)])
        passed = thresholds[None] <= top[:, None, None]  # [P + 1, 7, 126]
        q = (passed * steps[:, None]).sum(1)  # [P + 1, 126]; dyadic sums below 8: exact
        _TABLES[device] = (bounds.to(device), q.to(device))
    return _TABLES[device]


def pairwise_block_sum(sq: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum ``dim`` by a pairwise tree over adjacent pairs; an odd tail carries upward.

    For 16 elements: ``((s0+s1)+(s2+s3)) + ...``, the order every implementation uses.
    """
    dim = dim % sq.dim()
    lead = (slice(None),) * dim
    while sq.shape[dim] > 1:
        n = sq.shape[dim]
        paired = sq[lead + (slice(0, n - 1, 2),)] + sq[lead + (slice(1, n, 2),)]
        sq = torch.cat([paired, sq[lead + (slice(n - 1, None),)]], dim=dim) if n % 2 else paired
    return sq.select(dim, 0)


def chunk_blocks(x: torch.Tensor, n_blocks: int, block_size: int) -> int:
    """Blocks per chunk: at most :data:`CHUNK_BLOCKS` (CPU), and within the extra-memory budget."""
    budget = max(2 * x.numel() * x.element_size(), MEMORY_FLOOR_BYTES)
    budget -= 8 * n_blocks  # the output and the fp32 view of it
    budget -= _interval_tables(x.device)[1].numel() * 4  # the per-call table Q * (v * s2)
    per_block = BYTES_PER_BLOCK * max(block_size, 16) // 16
    cap = CHUNK_BLOCKS_CUDA if x.device.type == "cuda" else CHUNK_BLOCKS
    return max(1, min(n_blocks, cap, budget // per_block))


def block_losses(absw: torch.Tensor, u: torch.Tensor, v: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Loss of every block at one FP8 code value ``v`` (0-dim), fp32 ``[B]``: the definition, one
    candidate at a time (tests and benchmarks score single codes with it).

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

    Inputs are assumed validated (see :func:`nvfp4_qat.nvfp4_scale_sweep`). About a dozen tensor
    operations per chunk of :func:`chunk_blocks` blocks, none per candidate.

    Returns:
        fp32 tensor ``[n_blocks]`` on ``x``'s device.
    """
    n_blocks = x.numel() // block_size
    blocks = x.reshape(n_blocks, block_size)  # (n_blocks, bs), a view when x is contiguous
    s2 = global_scale(global_amax)
    bounds, q_table = _interval_tables(x.device)
    values = fp8_code_values(x.device)  # [126]
    # [P + 1, 126]: q * (v * s2), rounded as fake_quantize_unchecked rounds it. With s2 == 0 (an
    # all-zero tensor) u is NaN or inf and any row is 0: every block gets 0 * candidate = 0.
    dequant = q_table * (values * s2)
    candidates = fp8_scale_candidates(x.device)  # [126] = values / 448
    g = global_amax.reshape(()).to(torch.float32)
    out = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    step = chunk_blocks(x, n_blocks, block_size)
    for start in range(0, n_blocks, step):
        absw = blocks[start : start + step].to(torch.float32).abs()  # (B, bs)
        interval = torch.searchsorted(bounds, absw / s2)  # (B, bs), u = |w| / s2 as the definition
        sq = dequant.index_select(0, interval.reshape(-1)).view(absw.shape[0], block_size, -1)
        torch.sub(absw[:, :, None], sq, out=sq)  # (B, bs, 126)
        sq.mul_(sq)
        loss = pairwise_block_sum(sq, dim=1)  # (B, 126)
        best = loss.argmin(dim=1)  # the first minimum: the smallest code
        out[start : start + step] = candidates[best] * g
        del absw, interval, sq, loss, best
    return out
