"""Recalibration with the sweep split across the ranks of ``torch.distributed``.

:func:`~nvfp4_qat.recalibrate` sweeps every layer in the calling process, so under DDP each rank
would repeat all the work and under FSDP2 each rank would gather every full weight. Here every
rank does a share and the results are exchanged; the scales are bit-identical to a one-process
:func:`~nvfp4_qat.recalibrate` of the full weights (the sweep is per 16-element block):

* replicated weights (DDP): each layer is swept by one rank (:func:`layer_owners`: largest first,
  to the least-loaded rank); each rank then broadcasts the scales of its layers in one buffer;
* row-sharded weights (FSDP2 ``fully_shard``: ``DTensor`` with ``Shard(0)`` over a 1-D mesh of all
  ranks): each rank sweeps its own rows after an all-reduce (max) of the global amax. Blocks run
  along the last dim, so they stay whole on each rank and a block's scale depends only on its 16
  values and the global amax. The block-scale rows are then all-gathered (1/8 of the bytes of a
  bf16 weight gather);
* any other ``DTensor`` layout (2-D meshes, column shards): every rank gathers the weight and
  sweeps it, as :func:`~nvfp4_qat.recalibrate` does (correct, not split).

The report statistics are summed in one float64 all-reduce, so every rank returns the same report.
:func:`check_strategy` refuses the Lightning strategies whose parameters this cannot read.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.policy import InputMoments, RecalibrationPolicy, resolve_policy
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.recalibrate import (
    LayerClock,
    LayerRecalibration,
    RecalibrationReport,
    apply_nonfinite_policy,
    change_stats,
    checked_layers,
    clock_device,
    finite_flags,
    full_weight,
    recalibrate,
    scale_codes,
    skipped_row,
    update_layer,
    weight_stats,
)
from nvfp4_qat.sweep import sweep_with_stats

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["check_strategy", "distributed_world_size", "layer_owners", "recalibrate_distributed"]

# Where each layer is swept (besides a rank number, for a replicated weight's owner).
_ROWS, _GATHER = "rows", "gather"


def distributed_world_size() -> int:
    """The default process group's size, or 1 when ``torch.distributed`` is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_strategy(strategy: Any) -> None:
    """Refuse a Lightning strategy whose parameters the recalibration cannot read correctly.

    FSDP1 (``FSDPStrategy``) flattens the parameters of a wrapped module into one sharded
    ``FlatParameter``, and DeepSpeed partitions them in its own way (ZeRO-3: empty placeholders), so
    a layer's weight is not its rows. Supported: a single device, DDP, and FSDP2 through
    ``ModelParallelStrategy`` with ``fully_shard``.

    Raises:
        ValueError: ``strategy`` is an ``FSDPStrategy`` or a ``DeepSpeedStrategy`` (or a subclass).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    for cls, why in (
        (FSDPStrategy, "FSDP1 keeps each wrapped module's parameters in one flat, sharded FlatParameter"),
        (DeepSpeedStrategy, "DeepSpeed partitions the parameters outside the modules' own tensors"),
    ):
        if isinstance(strategy, cls):
            name = cls.__name__ if type(strategy) is cls else f"{type(strategy).__name__} (a {cls.__name__})"
            raise ValueError(
                f"NVFP4Recalibration does not support the strategy {name}: {why}, so "
                "a layer's block scales cannot be computed from its weight. Supported: a single device, "
                "DDP (strategy='ddp'), and FSDP2 (ModelParallelStrategy with fully_shard in configure_model)"
            )


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


def _plan(layers: list[tuple[str, NVFP4Linear]], world: int) -> list[int | str]:
    """Per layer: the owner rank of a replicated weight, ``_ROWS`` or ``_GATHER``."""
    plain = [i for i, (_, m) in enumerate(layers) if not _is_dtensor(m.weight)]
    owner = dict(zip(plain, layer_owners([layers[i][1].weight.numel() for i in plain], world), strict=True))
    return [
        owner[i] if i in owner else _ROWS if _row_sharded(m.weight, world) else _GATHER
        for i, (_, m) in enumerate(layers)
    ]


def _check_and_reduce_amax(
    layers: list[tuple[str, NVFP4Linear]], plan: list[int | str], rank: int, device: torch.device
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], set[int]]:
    """Each rank checks what it sweeps (its own layers, its rows, its shard of a gathered weight).

    Returns ``(weight_stats before, global amax of row-sharded layers, bad layers)``, the last two the same on
    every rank: the non-finite flags and the row shards' amax share one all-reduce (max), so every
    rank learns together which layers are bad (a rank that raised alone would leave the others
    waiting in the next collective).
    """
    sse: dict[int, torch.Tensor] = {}
    parts: dict[int, torch.Tensor] = {}
    amax: dict[int, torch.Tensor] = {}
    for i, (_, m) in enumerate(layers):
        if plan[i] == rank:
            parts[i] = m.weight.detach()
            sse[i] = weight_stats(m, parts[i])
        elif plan[i] == _ROWS:
            local, first = _local_rows(m.weight)  # (rows, in); rows may be 0 on the last ranks
            parts[i], rows = local, local.shape[0]
            amax[i] = torch.zeros((), dtype=torch.float32, device=device)
            if rows:
                sse[i] = weight_stats(m, local, slice(first, first + rows))
                amax[i] = sse[i][1]
        elif plan[i] == _GATHER:  # its SSE needs the gathered weight: check the local shard exactly
            parts[i] = m.weight.to_local().detach()
    checked = list(parts)
    finite = finite_flags([sse[i][0] if i in sse else None for i in checked], lambda k: parts[checked[k]])
    flags = torch.zeros(len(layers), dtype=torch.float32)
    flags[[i for i, ok in zip(checked, finite, strict=True) if not ok]] = 1.0
    flags = flags.to(device)
    # A replica this rank does not sweep is checked too (one read, no host sync): a NaN there would
    # otherwise stay unseen, since its owner's copy is finite and its scales come from the owner.
    others = [i for i, p in enumerate(plan) if isinstance(p, int) and p != rank]
    if others:
        nonfinite = [(~torch.isfinite(layers[i][1].weight.detach())).any().to(device) for i in others]
        flags[others] = torch.stack(nonfinite).to(torch.float32)
    reduced = torch.cat([flags, *(a.reshape(1) for a in amax.values())])
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    bad = {i for i, flag in enumerate(reduced[: len(layers)].tolist()) if flag}
    g = {i: reduced[len(layers) + k].clone() for k, i in enumerate(amax)}
    return sse, g, bad


_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bit_sum(w: torch.Tensor) -> torch.Tensor:
    """int64 sum of the weight's bit patterns: exact and independent of the summation order, so
    replicas give the same value on every rank exactly when (almost surely) their bits agree."""
    w = w.detach().contiguous()
    bits = w.view(_BITS[w.dtype]) if w.dtype in _BITS else w.to(torch.float32).view(torch.int32)
    return bits.sum(dtype=torch.int64)


def _check_replicas(
    layers: list[tuple[str, NVFP4Linear]], plan: list[int | str], bad: set[int], device: torch.device
) -> None:
    """Raise on every rank if replicated weights differ between ranks (one int64 all-reduce).

    Each replicated layer is swept by one rank and its scales are copied to the others, so a rank
    whose weights drifted would silently get scales computed from another rank's weights.
    Layers with non-finite weights (``bad``) are left to the non-finite policy.
    """
    replicated = [i for i, p in enumerate(plan) if isinstance(p, int) and i not in bad]
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
            "recalibrate_distributed sweeps each replicated layer on one rank and copies its scales, "
            "so every rank must hold the same weights (as DDP keeps them); no scale was changed. "
            "Look for rank-dependent weight updates or a checkpoint loaded on some ranks only"
        )


def _sweep_own_rows(
    m: NVFP4Linear,
    g: torch.Tensor,
    before: torch.Tensor | None,
    stats: torch.Tensor,
    rank: int,
    backend: str,
    method: str,
) -> None:
    """Sweep this rank's rows of a row-sharded weight; every rank ends with all the block scales.

    Writes this rank's sums into ``stats[:4]`` (and, on rank 0, the amax pair into ``stats[4:6]``).
    """
    from torch.distributed.tensor import DTensor, Shard

    w = m.weight
    local, first = _local_rows(w)
    rows = local.shape[0]
    b_local = torch.empty(0, m.block_amax.shape[1], dtype=torch.float32, device=local.device)
    if rows:
        old = scale_codes(m, slice(first, first + rows))
        b_flat, _, sse_after, n_changed = sweep_with_stats(local, g, backend, method, old)
        b_local = b_flat.reshape(rows, -1)  # (rows, in // 16)
        stats[:4] = change_stats(before, sse_after, n_changed)
    full = DTensor.from_local(
        b_local, w.device_mesh, [Shard(0)], shape=m.block_amax.shape, stride=m.block_amax.stride()
    ).full_tensor()
    if rank == 0:
        stats[4:6] = torch.stack([m.global_amax, g])  # read before the writes below (same stream)
    m.global_amax.copy_(g)
    m.block_amax.copy_(full)


def _broadcast_owned_scales(
    layers: list[tuple[str, NVFP4Linear]], plan: list[int | str], bad: set[int], rank: int, world: int
) -> None:
    """Each rank broadcasts ``[global_amax, block_amax...]`` of the layers it swept, in one buffer."""
    for src in range(world):
        mods = [m for i, (_, m) in enumerate(layers) if plan[i] == src and i not in bad]
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


def recalibrate_distributed(
    model: nn.Module,
    backend: str = "auto",
    method: str = "pruned",
    on_nonfinite: str = "raise",
    policy: str | RecalibrationPolicy = "mse",
    optimizer: torch.optim.Optimizer | None = None,
    input_moments: InputMoments | None = None,
    evaluate: Callable[[], float] | None = None,
) -> RecalibrationReport:
    """:func:`~nvfp4_qat.recalibrate` with the sweep split across the ranks of the default group.

    A collective: every rank must call it, at the same point, on the same model structure. Plain
    weights must be replicas (as under DDP): the owner's scales are broadcast to every rank. Every
    rank checks every replica it holds for NaN/Inf, and an all-reduced checksum of the replicas'
    bits (exact, order-independent) catches ranks whose weights diverged. With no process group,
    or a world of one, this is :func:`~nvfp4_qat.recalibrate`.

    Args:
        model: holds ``NVFP4Linear`` layers with plain (replicated) or FSDP2 ``DTensor`` weights.
        backend, method: sweep settings, as :func:`~nvfp4_qat.recalibrate`.
        on_nonfinite: ``"raise"``: a NaN/Inf weight anywhere makes every rank raise the same
            ``ValueError``, before any scale is written; ``"skip"``: those layers keep their scales on
            every rank, and rank 0 warns once naming them.

        policy, optimizer, input_moments, evaluate: as :func:`~nvfp4_qat.recalibrate`. A policy
            other than the plain ``"mse"`` sweep runs on every rank for every layer (replicas
            compute the same scales from the same weights and optimizer state); the input
            statistics are summed over the ranks first and ``evaluate`` should return the mean
            over the ranks (the callback's does). The ``gradient`` criterion needs unsharded
            optimizer state and is refused under FSDP2.

    Returns:
        The same report on every rank (a layer's ``seconds`` are measured as in
        :func:`~nvfp4_qat.recalibrate`, on the rank that swept it, or on rank 0 for a sharded one).

    Raises:
        TypeError, ValueError: as :func:`~nvfp4_qat.recalibrate`.
        RuntimeError: replicated weights differ between ranks (raised on every rank, before any
            scale is written).
    """
    world = distributed_world_size()
    chosen = resolve_policy(policy)
    if world == 1 or not chosen.is_plain_sweep:
        if world > 1:
            _prepare_policy_inputs(model, chosen, input_moments)
        return recalibrate(model, backend, method, on_nonfinite, chosen, optimizer, input_moments, evaluate)
    layers = checked_layers(model, backend, method, on_nonfinite)
    rank = dist.get_rank()
    device = layers[0][1].block_amax.device
    plan = _plan(layers, world)
    start = time.perf_counter()
    with torch.no_grad():
        sse_before, g_rows, bad = _check_and_reduce_amax(layers, plan, rank, device)
        apply_nonfinite_policy([layers[i][0] for i in sorted(bad)], on_nonfinite, warn=rank == 0)
        _check_replicas(layers, plan, bad, device)
        # stats[i] = [sse_before, sse_after, n_changed, energy, amax_before, amax_after, seconds]:
        # each rank writes what it knows and leaves zeros elsewhere, so one SUM gives every rank
        # every value exactly (x + 0 == x); a row shard's sums add up over the ranks.
        stats = torch.zeros(len(layers), 7, dtype=torch.float64, device=device)
        clock, reported = LayerClock(clock_device(layers)), set()  # no host sync per layer
        for i, (_, m) in enumerate(layers):
            if i not in bad and plan[i] == _ROWS:
                _sweep_own_rows(m, g_rows[i], sse_before.get(i), stats[i], rank, backend, method)
                if rank == 0:
                    reported.add(i)
            elif i not in bad and plan[i] in (rank, _GATHER):
                w = full_weight(m)  # _GATHER: a collective
                # _GATHER: no stats yet (finiteness was checked on the shards): update_layer measures
                values = update_layer(w, m, backend, method, sse_before.get(i))
                if plan[i] == rank or rank == 0:
                    stats[i, :6] = values
                    reported.add(i)
            clock.mark()
        seconds = clock.seconds()
        stats[:, 6] = torch.tensor([seconds[i] if i in reported else 0.0 for i in range(len(layers))])
        _broadcast_owned_scales(layers, plan, bad, rank, world)
        dist.all_reduce(stats)
        rows = [
            skipped_row(name, m) if i in bad else LayerRecalibration.from_stats(name, m.weight.numel(), *s)
            for i, ((name, m), s) in enumerate(zip(layers, stats.tolist(), strict=True))
        ]
    return RecalibrationReport(layers=rows, seconds=time.perf_counter() - start)


def _prepare_policy_inputs(
    model: nn.Module, policy: RecalibrationPolicy, input_moments: InputMoments | None
) -> None:
    """Make a policy's inputs equal on every rank (or refuse what cannot be)."""
    if policy.needs_optimizer and any(
        type(m.weight.data) is not torch.Tensor for _, m in nvfp4_layers(model)
    ):
        raise ValueError(
            "policy criterion 'gradient' is not supported with sharded weights (FSDP2): the "
            "optimizer state is sharded too; use a policy without it (e.g. policy='mse')"
        )
    if policy.needs_input_moments and input_moments is not None:
        input_moments.all_reduce()
