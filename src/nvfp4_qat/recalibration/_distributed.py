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


def _check_replicas(layers: Layers, where: list[int | str], bad: set[int], device: torch.device) -> None:
    """Raise on every rank if replicated weights differ between ranks (one int64 all-reduce).

    Each replicated layer is swept by one rank and its scales are copied to the others, so a rank
    whose weights drifted would silently get scales computed from another rank's weights.
    Layers with non-finite weights (``bad``) are left to the non-finite policy.
    """
    replicated = [i for i, p in enumerate(where) if isinstance(p, int) and i not in bad]
    if not replicated:
        return
    sums = torch.stack([_bit_sum(layers[i][1].weight).to(device) for i in replicated])
    both = torch.cat([sums, -sums])  # one MAX gives the largest and (negated) the smallest checksum
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(replicated)].tolist(), [-v for v in both[len(replicated) :].tolist()]
    diverged = [layers[i][0] for k, i in enumerate(replicated) if high[k] != low[k]]
    if diverged:
        raise RuntimeError(
            f"replicated weights differ between ranks in {len(diverged)} layer(s), e.g. {diverged[:5]}: "
            "the recalibration sweeps each replicated layer on one rank and copies its scales, "
            "so every rank must hold the same weights (as DDP keeps them); no scale was changed. "
            "Look for rank-dependent weight updates or a checkpoint loaded on some ranks only"
        )


def sweep_distributed(plan: RecalibrationPlan) -> tuple[LayerStats, list[bool], list[float]]:
    """The plain sweep of ``plan.layers`` split across the ranks; every rank ends with every scale.

    Returns ``(stats [L], done, seconds)``, the same on every rank: the measurements (a row
    shard's sums add up over the ranks), whether each layer was recalibrated, and the device time
    of its sweep on the rank that did it (rank 0 for a sharded one).

    Raises:
        ValueError: non-finite weights with ``on_nonfinite="raise"`` (every rank, nothing written).
        RuntimeError: replicated weights differ between ranks (every rank, nothing written).
    """
    layers, rank, world = plan.layers, dist.get_rank(), plan.world
    device = layers[0][1].block_amax.device
    fused = plan.execution == "fused"
    where = _placement(layers, world)
    mine, tasks = [], []
    for i, (_, m) in enumerate(layers):
        if where[i] == rank:
            task = SweepTask(m, m.weight.detach())
        elif where[i] == _ROWS:
            local, first = _local_rows(m.weight)  # (rows, in); no rows on the last ranks, maybe
            task = SweepTask(m, local, slice(first, first + local.shape[0])) if local.shape[0] else None
        elif where[i] == _GATHER:
            task = SweepTask(m, full_weight(m))  # a collective: every rank gathers and sweeps it
        else:
            task = None
        if task is not None:
            mine.append(i)
            tasks.append(task)
    before = stale_stats(tasks, fused) if tasks else torch.zeros(0, 3, device=device)
    index = torch.tensor(mine, dtype=torch.int64).to(device)
    # What this rank sweeps is checked through its max |w| (NaN/Inf exactly for a bad weight);
    # a replica it does not sweep is checked too (one read, no host sync): a NaN there would
    # otherwise stay unseen, since its owner's copy is finite and its scales come from the owner.
    bad_flags = torch.zeros(len(layers), dtype=torch.float32, device=device)
    bad_flags.index_copy_(0, index, (~torch.isfinite(before[:, 1])).to(torch.float32))
    others = [i for i, p in enumerate(where) if isinstance(p, int) and p != rank]
    if others:
        nonfinite = [(~torch.isfinite(layers[i][1].weight.detach())).any() for i in others]
        bad_flags[others] = torch.stack(nonfinite).to(device, torch.float32)
    # A row-sharded layer's global amax is the max over the ranks' rows (0 where a rank has none).
    rows = [i for i, p in enumerate(where) if p == _ROWS]
    row_amax = torch.zeros(len(layers), dtype=torch.float32, device=device)
    row_amax.index_copy_(0, index, torch.nan_to_num(before[:, 1], nan=0.0, posinf=0.0))
    reduced = torch.cat([bad_flags, row_amax[rows]])
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    bad = {i for i, flag in enumerate(reduced[: len(layers)].tolist()) if flag}
    apply_nonfinite_policy([layers[i][0] for i in sorted(bad)], plan.on_nonfinite, warn=rank == 0)
    _check_replicas(layers, where, bad, device)

    g_new = before[:, 1].clone()  # max |w| of what each task holds ...
    g_all = torch.zeros(len(layers), dtype=torch.float32, device=device)
    g_all[rows] = reduced[len(layers) :]  # ... and the reduced one for the row shards
    is_rows = torch.tensor([where[i] == _ROWS for i in mine], dtype=torch.bool).to(device)
    g_new = torch.where(is_rows, g_all[index], g_new)
    live = [i not in bad for i in mine]
    live_t = torch.tensor(live, dtype=torch.bool).to(device)
    g_old = torch.stack([m.global_amax for _, m in layers]).to(device)
    out = sweep(tasks, torch.where(live_t, g_new, torch.nan), plan.method, plan.backend, fused)

    # Write: global amax of what this rank swept; every rank takes a row-sharded layer's.
    for task, ok, g in zip(tasks, live, g_new.unbind(), strict=True):
        if ok:
            task.layer.global_amax.copy_(g)
    for i in rows:
        if i not in bad:
            layers[i][1].global_amax.copy_(g_all[i])
    install_kernel_states(tasks, out, live)
    _gather_rows(layers, [i for i in rows if i not in bad])
    _broadcast_owned_scales(layers, where, bad, rank, world)

    # stats[i] = the six LayerStats fields and the seconds: each rank writes what it knows and
    # leaves zeros elsewhere, so one SUM gives every rank every value exactly (x + 0 == x); a row
    # shard's sums add up over the ranks, its amaxes and seconds come from rank 0.
    own = LayerStats(before[:, 0], out.sse_after, out.n_changed, before[:, 2], g_old[index], g_new)
    values = own.to_tensor().T  # (T, 6) float64
    seconds = torch.tensor(out.seconds, dtype=torch.float64).to(device)[:, None]
    reports = [where[i] == rank or (where[i] == _GATHER and rank == 0) for i in mine]
    keep = torch.tensor(
        [[r or (where[i] == _ROWS and (k < 4 or rank == 0)) for k in range(6)] + [r or (where[i] == _ROWS and rank == 0)]
         for i, r in zip(mine, reports, strict=True)],
        dtype=torch.bool,
    ).reshape(len(mine), 7).to(device)  # fmt: skip
    keep &= live_t[:, None]
    table = torch.zeros(len(layers), 7, dtype=torch.float64, device=device)
    table.index_add_(0, index, torch.where(keep, torch.cat([values, seconds], dim=1), 0.0))
    # Rank 0 may hold no rows of a sharded layer: the amaxes are known to all, rank 0 writes them.
    if rank == 0:
        for i in rows:
            if i not in bad and i not in mine:
                table[i, 4], table[i, 5] = g_old[i].double(), g_all[i].double()
    dist.all_reduce(table)
    done = [i not in bad for i in range(len(layers))]
    return LayerStats.from_tensor(table[:, :6].T), done, table[:, 6].tolist()


def _gather_rows(layers: Layers, rows: list[int]) -> None:
    """Every rank gets all block-scale rows of the row-sharded layers (each swept its own)."""
    from torch.distributed.tensor import DTensor, Shard

    for i in rows:
        m = layers[i][1]
        w = m.weight
        local, first = _local_rows(w)
        b_local = m.block_amax[first : first + local.shape[0]]  # (rows, in // 16), this rank's sweep
        full = DTensor.from_local(
            b_local, w.device_mesh, [Shard(0)], shape=m.block_amax.shape, stride=m.block_amax.stride()
        ).full_tensor()
        m.block_amax.copy_(full)


def _broadcast_owned_scales(layers: Layers, where: list[int | str], bad: set[int], rank: int, world: int) -> None:
    """Each rank broadcasts ``[global_amax, block_amax...]`` of the layers it swept, in one buffer."""
    for src in range(world):
        mods = [m for i, (_, m) in enumerate(layers) if where[i] == src and i not in bad]
        if not mods:
            continue
        sizes = [1 + m.block_amax.numel() for m in mods]
        if src == rank:
            flat = torch.cat([torch.cat([m.global_amax.reshape(1), m.block_amax.reshape(-1)]) for m in mods])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=mods[0].block_amax.device)
        dist.broadcast(flat, src=src)
        if src != rank:
            for m, part in zip(mods, flat.split(sizes), strict=True):
                m.global_amax.copy_(part[0])
                m.block_amax.copy_(part[1:].reshape(m.block_amax.shape))
