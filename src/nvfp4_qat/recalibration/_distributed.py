"""The plain sweep split across the ranks of ``torch.distributed`` (a collective).

Without this each rank would repeat all the work under DDP, and under FSDP2 gather every full
weight. Here every rank sweeps a share, through the same steps as one process
(:mod:`~nvfp4_qat.recalibration._execute`: the fused GPU path where the plan chose it), and the
results are exchanged; the scales are bit-identical to a one-process recalibration of the full
weights (the sweep is per 16-element block):

* replicated weights (DDP): each layer is swept by one rank (:func:`layer_owners`: largest first,
  to the least-loaded rank); each rank then broadcasts the scales of its layers in one buffer;
* row-sharded weights (FSDP2 ``fully_shard``: ``DTensor`` with ``Shard(0)`` over a 1-D mesh of all
  ranks): each rank sweeps its own rows after an all-reduce (max) of the global amax. Blocks run
  along the last dim, so they stay whole on each rank and a block's scale depends only on its 16
  values and the global amax. The block-scale rows are then all-gathered (1/8 of the bytes of a
  bf16 weight gather);
* any other ``DTensor`` layout (2-D meshes, column shards): every rank gathers the weight and
  sweeps it (correct, not split).

Every rank checks what it sweeps and every replica it holds for NaN/Inf, and an all-reduced
checksum of the replicas' bits catches ranks whose weights diverged; both before any scale is
written, and every rank raises together. The statistics are summed in one float64 all-reduce, so
every rank returns the same report.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nvfp4_qat._backend import on_device
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.recalibration._execute import SweepTask, install_kernel_states, stale_stats, sweep
from nvfp4_qat.recalibration._layers import apply_nonfinite_policy, full_weight
from nvfp4_qat.recalibration.plan import RecalibrationPlan
from nvfp4_qat.recalibration.report import LayerStats

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["layer_owners", "sweep_distributed"]

Layers = list[tuple[str, NVFP4Linear]]
# Where each layer is swept (besides a rank number, for a replicated weight's owner).
_ROWS, _GATHER = "rows", "gather"


def layer_owners(sizes: list[int], world: int) -> list[int]:
    """Rank that sweeps each layer: largest layers first, each to the least-loaded rank.

    Deterministic (ties go to the lower rank, then to the earlier layer), so every rank computes
    the same map without communicating.
    """
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world), key=lambda r: load[r])
        owner[i], load[rank] = rank, load[rank] + sizes[i]
    return owner


def _is_dtensor(w: object) -> bool:
    # A DTensor exists only once torch.distributed.tensor was imported (by FSDP2, by the user):
    # look it up there instead of importing it (a second at `import nvfp4_qat` on a small CPU).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(w, module.DTensor)


def _row_sharded(w: torch.Tensor, world: int) -> bool:
    from torch.distributed.tensor import Shard

    return (
        _is_dtensor(w)
        and w.device_mesh.ndim == 1
        and w.device_mesh.size() == world
        and tuple(w.placements) == (Shard(0),)
        # the rows are exchanged over the default group: mesh position i must be global rank i
        and w.device_mesh.mesh.flatten().tolist() == list(range(world))
    )


def _local_rows(w: DTensor) -> tuple[torch.Tensor, int]:
    """``(this rank's rows (rows, in), index of the first)``; ``Shard(0)`` follows ``torch.chunk``."""
    local = w.to_local().detach()
    chunk = -(-w.shape[0] // w.device_mesh.size())  # ceil
    return local, min(w.device_mesh.get_local_rank() * chunk, w.shape[0])


def _placement(layers: Layers, world: int) -> list[int | str]:
    """Per layer: the owner rank of a replicated weight, ``_ROWS`` or ``_GATHER``."""
    plain = [i for i, (_, m) in enumerate(layers) if not _is_dtensor(m.weight)]
    owner = dict(zip(plain, layer_owners([layers[i][1].weight.numel() for i in plain], world), strict=True))
    return [
        owner[i] if i in owner else _ROWS if _row_sharded(m.weight, world) else _GATHER
        for i, (_, m) in enumerate(layers)
    ]


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bit_sum(w: torch.Tensor) -> torch.Tensor:
    """int64 sum of the weight's bit patterns: exact and independent of the summation order, so
    replicas give the same value on every rank exactly when (almost surely) their bits agree."""
    w = w.detach().contiguous()
    bits = w.view(_BITS[w.dtype]) if w.dtype in _BITS else w.to(torch.float32).view(torch.int32)
    return bits.sum(dtype=torch.int64)


def sweep_distributed(plan: RecalibrationPlan) -> tuple[LayerStats, list[bool], list[float]]:
    """The plain sweep of ``plan.layers`` split across the ranks; every rank ends with every scale.

    On the fused path everything is queued without a host sync until the scales are exchanged (the
    generic path reads the live flags before its per-layer sweeps): the checks decide on
    the device (a global amax of NaN makes the sweep kernels skip a layer, and any stop makes them
    skip all), and the host reads the outcome once, at the end. A sync after the checks left the
    GPUs idle while the host launched the sweeps.

    Returns ``(stats [L], done, seconds)``, the same on every rank: the measurements (a row
    shard's sums add up over the ranks), whether each layer was recalibrated, and the device time
    of its sweep on the rank that did it (rank 0 for a sharded one).

    Raises:
        ValueError: non-finite weights with ``on_nonfinite="raise"`` (every rank, nothing written).
        RuntimeError: replicated weights differ between ranks (every rank, nothing written).
    """
    layers, rank, world = plan.layers, dist.get_rank(), plan.world
    n = len(layers)
    device = layers[0][1].block_amax.device
    fused = plan.execution == "fused"
    where = _placement(layers, world)
    replicated = [i for i, p in enumerate(where) if isinstance(p, int)]
    rows = [i for i, p in enumerate(where) if p == _ROWS]
    # Every rank measures every replica it holds (the stale statistics of the ones it sweeps, and
    # for all of them the NaN check and the fingerprint that finds diverged ranks), then its rows
    # of the sharded layers and the layers it gathers.
    measured, tasks = [], []
    for i, (_, m) in enumerate(layers):
        if isinstance(where[i], int):
            task = SweepTask(m, m.weight.detach())
        elif where[i] == _ROWS:
            local, first = _local_rows(m.weight)  # (rows, in); no rows on the last ranks, maybe
            task = SweepTask(m, local, slice(first, first + local.shape[0])) if local.shape[0] else None
        else:
            task = SweepTask(m, full_weight(m))  # _GATHER, a collective: every rank gathers and sweeps it
        if task is not None:
            measured.append(i)
            tasks.append(task)
    stats_all = stale_stats(tasks, fused)[1] if tasks else torch.zeros(0, 3, device=device)
    sweeps = [
        k for k, i in enumerate(measured) if where[i] in (rank, _ROWS, _GATHER)
    ]  # what this rank sweeps
    mine = [measured[k] for k in sweeps]
    tasks = [tasks[k] for k in sweeps]
    before = stats_all.index_select(0, on_device(sweeps, torch.int64, device))
    index = on_device(mine, torch.int64, device)
    # The checks, in two all-reduces (MAX): a non-finite flag per layer (max |w| is NaN or Inf
    # exactly for a bad weight) and the row shards' global amax; then the replicas' fingerprints.
    flags = torch.zeros(n, dtype=torch.float32, device=device)
    flags.index_copy_(0, on_device(measured, torch.int64, device), (~torch.isfinite(stats_all[:, 1])).float())
    amax = torch.zeros(n, dtype=torch.float32, device=device)
    amax.index_copy_(0, index, torch.nan_to_num(before[:, 1], nan=0.0, posinf=0.0))
    row_index = on_device(rows, torch.int64, device)
    reduced = torch.cat([flags, amax.index_select(0, row_index)])
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    bad = reduced[:n] > 0
    rep_index = on_device(replicated, torch.int64, device)
    position = {i: k for k, i in enumerate(measured)}
    rep_stats = stats_all.index_select(0, on_device([position[i] for i in replicated], torch.int64, device))
    prints = _fingerprints(layers, replicated, rep_stats, fused)
    both = torch.cat([prints, -prints])  # one MAX: the largest and (negated) the smallest per value
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    k = len(replicated)
    half = prints.numel()
    differ = (
        (both[:half] != -both[half:]).reshape(k, -1).any(dim=1) if k else torch.zeros(0, dtype=torch.bool)
    )
    diverged = differ.to(device) & ~bad.index_select(0, rep_index)  # a NaN replica is "bad" instead
    stop = diverged.any()
    if plan.on_nonfinite == "raise":
        stop = stop | bad.any()
    live = ~bad & ~stop  # [L]: the layers whose scales change
    g_rows = torch.zeros(n, dtype=torch.float32, device=device).index_copy_(0, row_index, reduced[n:])
    is_rows = on_device([where[i] == _ROWS for i in mine], torch.bool, device)
    g_new = torch.where(is_rows, g_rows.index_select(0, index), before[:, 1])
    live_task = live.index_select(0, index)
    g_old = torch.stack([m.global_amax for _, m in layers]).to(device)
    out = sweep(tasks, torch.where(live_task, g_new, torch.nan), plan.method, plan.backend, fused)

    # Write: the global amax of what this rank swept; every rank takes a row-sharded layer's. Then
    # exchange: row shards all-gathered (with their FP8 bytes on the fused path), replicated layers
    # broadcast by their owners (unchanged scales where nothing was written: the same everywhere).
    targets = [t.layer.global_amax for t in tasks] + [layers[i][1].global_amax for i in rows if i not in mine]
    values = torch.where(live_task, g_new, g_old.index_select(0, index)).unbind()
    extra = [torch.where(live[i], g_rows[i], g_old[i]) for i in rows if i not in mine]
    if targets:
        torch._foreach_copy_(targets, [*values, *extra])
    # Whether the bytes travel is the plan's decision, the same on every rank (a rank with nothing
    # to sweep has no bytes, but must still take part in the collectives).
    codes = dict(zip(mine, out.task_codes(tasks), strict=True)) if fused else None
    row_codes = _gather_rows(layers, rows, world, live, codes)
    received = _broadcast_owned_scales(layers, where, rank, world, live, codes)

    # The one host sync: what happened, and the sweeps' device times.
    seconds = out.seconds
    bad_host, live_host = torch.stack([bad, live]).tolist()
    diverged_host = diverged.tolist()
    apply_nonfinite_policy([layers[i][0] for i in range(n) if bad_host[i]], plan.on_nonfinite, warn=rank == 0)
    if any(diverged_host):
        names = [layers[i][0] for i, d in zip(replicated, diverged_host, strict=True) if d]
        raise RuntimeError(
            f"replicated weights differ between ranks in {len(names)} layer(s), e.g. {names[:5]}: "
            "the recalibration sweeps each replicated layer on one rank and copies its scales, "
            "so every rank must hold the same weights (as DDP keeps them); no scale was changed. "
            "Look for rank-dependent weight updates or a checkpoint loaded on some ranks only"
        )
    if codes is not None:  # the fake-quant kernel's state of the new scales, where this rank has the bytes
        pairs = [
            (t.layer, codes[i]) for t, i in zip(tasks, mine, strict=True) if t.rows is None and live_host[i]
        ]
        pairs += [(layers[i][1], c) for i, c in (*row_codes.items(), *received.items()) if live_host[i]]
        install_kernel_states(pairs)

    # stats[i] = the six LayerStats fields and the seconds: each rank writes what it knows and
    # leaves zeros elsewhere, so one SUM gives every rank every value exactly (x + 0 == x); a row
    # shard's sums add up over the ranks, its amaxes and seconds come from rank 0.
    own = LayerStats(
        before[:, 0], out.sse_after, out.n_changed, before[:, 2], g_old.index_select(0, index), g_new
    )
    reports = [where[i] == rank or (where[i] == _GATHER and rank == 0) for i in mine]
    keep = [
        [live_host[i] and (r or (where[i] == _ROWS and (c < 4 or rank == 0))) for c in range(7)]
        for i, r in zip(mine, reports, strict=True)
    ]
    table = torch.zeros(n, 7, dtype=torch.float64, device=device)
    if mine:
        values = torch.cat([own.to_tensor().T, on_device(seconds, torch.float64, device)[:, None]], dim=1)
        table.index_add_(0, index, torch.where(on_device(keep, torch.bool, device), values, 0.0))
    if rank == 0:  # rank 0 may hold no rows of a sharded layer: the amaxes are known to all
        for i in rows:
            if live_host[i] and i not in mine:
                table[i, 4], table[i, 5] = g_old[i].double(), g_rows[i].double()
    dist.all_reduce(table)
    return LayerStats.from_tensor(table[:, :6].T), live_host, table[:, 6].tolist()


def _fingerprints(layers: Layers, replicated: list[int], stats: torch.Tensor, fused: bool) -> torch.Tensor:
    """Per replicated layer, values that equal on every rank exactly when (almost surely) the
    replicas' bits do: a rank whose weights drifted would otherwise silently get scales computed from
    another rank's weights (each replicated layer is swept by one rank and its scales copied).

    Fused path: the bit patterns of ``max |w|`` and ``sum w^2`` from the stale statistics, which
    every rank has just computed with the same kernel in the same order (bit-reproducible; ranks on
    GPUs of different architectures would not be: the stats pass sums bf16 weights in another order
    on sm_90, and such a job is refused as diverged); no extra pass. Only weight values count (not
    the error at the current scales, which a NaN scale would make NaN on every rank), and a pure
    sign flip of weights goes unseen. Generic path: the int64 sum of the weight's bit patterns
    (exact and order-independent: PyTorch's sums of floats may group differently per process)."""
    device = stats.device
    if not replicated:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if fused:  # (k, 2) fp32 -> their int32 bits, widened for the reduction
        return stats[:, 1:3].contiguous().view(torch.int32).to(torch.int64).reshape(-1)
    return torch.stack([_bit_sum(layers[i][1].weight).to(device) for i in replicated])


def _gather_rows(
    layers: Layers, rows: list[int], world: int, live: torch.Tensor, codes: dict[int, torch.Tensor] | None
) -> dict[int, torch.Tensor]:
    """Every rank gets all block-scale rows of the row-sharded layers (each swept its own), in one
    all-gather: each rank's rows of every layer, padded to the layer's chunk (``torch.chunk``).
    With ``codes`` (this rank's new FP8 bytes per layer), the bytes are gathered too (a second,
    uint8 all-gather); returns each layer's full bytes then (else nothing)."""
    if not rows:
        return {}
    rank = dist.get_rank()
    mods = [layers[i][1] for i in rows]
    chunks = [-(-m.block_amax.shape[0] // world) for m in mods]  # rows per rank (the last may have fewer)
    sizes = [c * m.block_amax.shape[1] for c, m in zip(chunks, mods, strict=True)]
    parts = [m.block_amax[rank * c : (rank + 1) * c].reshape(-1) for m, c in zip(mods, chunks, strict=True)]
    device = mods[0].block_amax.device
    full = _all_gather_padded(parts, sizes, world, device)
    for i, m, c, f in zip(rows, mods, chunks, full, strict=True):
        gathered = f.reshape(world * c, -1)[: m.block_amax.shape[0]]
        m.block_amax.copy_(torch.where(live[i], gathered, m.block_amax))  # a stopped layer keeps its own
    if codes is None:
        return {}
    empty = torch.zeros(0, dtype=torch.uint8, device=device)
    full = _all_gather_padded([codes.get(i, empty) for i in rows], sizes, world, device)
    return {i: f[: m.block_amax.numel()] for i, m, f in zip(rows, mods, full, strict=True)}


def _all_gather_padded(
    parts: list[torch.Tensor], sizes: list[int], world: int, device: torch.device
) -> list[torch.Tensor]:
    """One all-gather of this rank's ``parts`` (one dtype; each padded to ``sizes``): per part,
    the ranks' pieces one after another, ``[world * size]``."""
    dtype = parts[0].dtype
    send = torch.zeros(sum(sizes), dtype=dtype, device=device)
    start = 0
    for part, size in zip(parts, sizes, strict=True):
        send[start : start + part.numel()].copy_(part)
        start += size
    got = torch.empty(world * sum(sizes), dtype=dtype, device=device)  # flat: gloo wants 1-D
    dist.all_gather_into_tensor(got, send)
    got = got.view(world, -1)
    out, start = [], 0
    for size in sizes:
        out.append(got[:, start : start + size].reshape(-1))
        start += size
    return out


def _broadcast_owned_scales(
    layers: Layers,
    where: list[int | str],
    rank: int,
    world: int,
    live: torch.Tensor,
    codes: dict[int, torch.Tensor] | None,
) -> dict[int, torch.Tensor]:
    """Each rank broadcasts ``[global_amax, block_amax...]`` of the layers it owns, in one buffer;
    with ``codes`` (the owner's new FP8 bytes per layer, fused path) the bytes too, in a second
    (uint8) one, and the received bytes are returned per layer: installed in the layers' kernel
    caches, they spare every rank the preparation of the scales it did not sweep (at the next
    forward, and at the next recalibration's statistics pass)."""
    received: dict[int, torch.Tensor] = {}
    for src in range(world):
        owned = [i for i in range(len(layers)) if where[i] == src]
        if not owned:
            continue
        mods = [layers[i][1] for i in owned]
        sizes = [1 + m.block_amax.numel() for m in mods]
        device = mods[0].block_amax.device
        if src == rank:
            flat = torch.cat([t for m in mods for t in (m.global_amax.reshape(1), m.block_amax.reshape(-1))])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        dist.broadcast(flat, src=src)
        if src != rank:
            parts = flat.split(sizes)
            # A layer that was not written (skipped, or everything stopped) keeps its own scales:
            # "no scale was changed" must hold on every rank, whatever the owner holds.
            ok = live.index_select(0, on_device(owned, torch.int64, device)).unbind()
            torch._foreach_copy_(
                [m.global_amax.reshape(1) for m in mods],
                [
                    torch.where(k, p[:1], m.global_amax.reshape(1))
                    for k, p, m in zip(ok, parts, mods, strict=True)
                ],
            )
            torch._foreach_copy_(
                [m.block_amax.view(-1) for m in mods],
                [
                    torch.where(k, p[1:], m.block_amax.view(-1))
                    for k, p, m in zip(ok, parts, mods, strict=True)
                ],
            )
        if codes is None:
            continue
        n_blocks = [m.block_amax.numel() for m in mods]
        if src == rank:
            flat = torch.cat([codes[i] for i in owned])
        else:
            flat = torch.empty(sum(n_blocks), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=src)
        if src != rank:
            received.update(zip(owned, flat.split(n_blocks), strict=True))
    return received
