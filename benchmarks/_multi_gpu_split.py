"""Prototype: NVFP4 recalibration with the sweep work split across ranks (for ``multi_gpu_qat.py``).

:func:`nvfp4_qat.recalibrate` (what :class:`~nvfp4_qat.NVFP4Recalibration` runs today) does the
whole sweep on every rank: under DDP each rank sweeps every layer, under FSDP2 each rank gathers
every full weight (``full_tensor()``) and sweeps it. Recalibration time therefore does not fall
with the world size. :func:`recalibrate_split` gives every rank a share and exchanges the results:

* replicated weights (DDP): each layer is swept by one rank (greedy balance by element count);
  each rank then broadcasts the scales of its layers in one flat buffer;
* row-sharded weights (FSDP2 ``DTensor`` with ``Shard(0)`` on a 1-D mesh): every rank sweeps its
  own rows after an all-reduce (max) of the per-tensor amax; 16-blocks run along the last dim, so
  they stay whole on each rank and a block's scale depends only on its 16 values and the global
  amax. The block-scale rows are then all-gathered (1/8 of the bytes of a bf16 weight gather).

Both give bit-identical scales to :func:`~nvfp4_qat.recalibrate` on the full weights (the sweep is
per block); ``multi_gpu_qat.py`` checks that with ``torch.equal``. It lives here, not in the
package, until the callback's owner adopts it. Every rank must call it (it is a collective).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from typing_extensions import override

from nvfp4_qat import NVFP4Recalibration
from nvfp4_qat.format import block_codes, global_scale
from nvfp4_qat.modules import NVFP4Linear, fake_quant_sse
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.recalibrate import LayerRecalibration, RecalibrationReport, recalibrate_layer
from nvfp4_qat.sweep import nvfp4_scale_sweep

__all__ = ["SplitRecalibration", "layer_owners", "recalibrate_split"]


def layer_owners(sizes: list[int], world: int) -> list[int]:
    """Rank that sweeps each layer: largest layers first, each to the least-loaded rank.

    Deterministic (ties go to the lower rank / earlier layer), so every rank computes the same map.
    """
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world), key=lambda r: load[r])
        owner[i], load[rank] = rank, load[rank] + sizes[i]
    return owner


def _row_sharded(w: torch.Tensor) -> bool:
    return isinstance(w, DTensor) and w.device_mesh.ndim == 1 and tuple(w.placements) == (Shard(0),)


def _local_rows(layer: NVFP4Linear) -> tuple[torch.Tensor, int]:
    """``(local weight rows, index of the first one)``; DTensor shards follow ``torch.chunk``."""
    w = layer.weight
    local = w.to_local().detach()
    chunk = -(-w.shape[0] // w.device_mesh.size())  # ceil
    first = min(w.device_mesh.get_local_rank() * chunk, w.shape[0])
    return local, first


def _recalibrate_shard(name: str, layer: NVFP4Linear, backend: str, method: str) -> LayerRecalibration:
    """Sweep this rank's rows of a row-sharded weight; every rank ends with the whole scale set."""
    start = time.perf_counter()
    w = layer.weight
    group = w.device_mesh.get_group()
    local, first = _local_rows(layer)  # (rows, in)
    rows, cols = local.shape[0], layer.block_amax.shape[1]
    g_old, b_old = layer.global_amax.clone(), layer.block_amax[first : first + rows].clone()
    g = torch.zeros((), dtype=torch.float32, device=local.device)
    if rows:
        g = torch.linalg.vector_norm(local, float("inf")).to(torch.float32)
    dist.all_reduce(g, op=dist.ReduceOp.MAX, group=group)
    stats = torch.zeros(4, dtype=torch.float64, device=local.device)  # sse before/after, changed, energy
    b_local = torch.empty(0, cols, dtype=torch.float32, device=local.device)
    if rows:
        b_local = nvfp4_scale_sweep(local, g, backend=backend, method=method).reshape(rows, cols)
        codes_old, codes_new = block_codes(b_old, global_scale(g_old)), block_codes(b_local, global_scale(g))
        stats = torch.stack(
            [
                fake_quant_sse(local, b_old, g_old).to(torch.float64),
                fake_quant_sse(local, b_local, g).to(torch.float64),
                (codes_new != codes_old).sum().to(torch.float64),
                torch.linalg.vector_norm(local, dtype=torch.float32).square().to(torch.float64),
            ]
        )
    dist.all_reduce(stats, group=group)
    full = DTensor.from_local(
        b_local, w.device_mesh, [Shard(0)], shape=layer.block_amax.shape, stride=layer.block_amax.stride()
    ).full_tensor()
    layer.global_amax.copy_(g)
    layer.block_amax.copy_(full)
    before, after, changed, energy = stats.tolist()
    amax_before, amax_after = torch.stack([g_old, g]).tolist()
    numel = w.numel()
    return LayerRecalibration(
        name, numel, before, after, before / numel, after / numel, changed / layer.block_amax.numel(),
        amax_before, amax_after, time.perf_counter() - start, energy=energy,
    )  # fmt: skip


def _check_finite(layers: list[tuple[str, NVFP4Linear]], mine: list[bool], device: torch.device) -> None:
    # Each rank looks at what it sweeps; the MIN all-reduce makes every rank raise together (a
    # rank that raised alone would leave the others waiting in the next collective).
    ok = torch.ones(len(layers), dtype=torch.int32, device=device)
    for i, ((_, m), own) in enumerate(zip(layers, mine, strict=True)):
        w = _local_rows(m)[0] if _row_sharded(m.weight) else m.weight.detach()
        if own and w.numel() and not bool(torch.isfinite(w).all()):
            ok[i] = 0
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    bad = [name for (name, _), flag in zip(layers, ok.tolist(), strict=True) if not flag]
    if bad:
        raise ValueError(f"non-finite (NaN/Inf) weights in layer {bad[0]!r}; no scale was changed")


def recalibrate_split(model: nn.Module, backend: str = "auto", method: str = "pruned") -> RecalibrationReport:
    """:func:`nvfp4_qat.recalibrate` with the sweep split across the ranks of the default group.

    Args:
        model: holds ``NVFP4Linear`` layers with plain (replicated) or row-sharded DTensor weights.
        backend, method: sweep settings, as :func:`nvfp4_qat.recalibrate`.

    Returns:
        The same report on every rank (rows of layers swept elsewhere are all-gathered).

    Raises:
        ValueError: no ``NVFP4Linear`` layers, or a non-finite weight (on every rank, before any
            scale is written).
    """
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("model holds no NVFP4Linear layers; prepare it with quantize_model() first")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = layers[0][1].block_amax.device
    start = time.perf_counter()
    with torch.no_grad():
        sharded = [_row_sharded(m.weight) for _, m in layers]
        plain = [i for i, s in enumerate(sharded) if not s]
        owner = dict(
            zip(plain, layer_owners([layers[i][1].weight.numel() for i in plain], world), strict=True)
        )
        _check_finite(layers, [s or owner[i] == rank for i, s in enumerate(sharded)], device)
        rows: dict[int, LayerRecalibration] = {}
        for i, (name, m) in enumerate(layers):
            if sharded[i]:
                rows[i] = _recalibrate_shard(name, m, backend, method)
            elif owner[i] == rank:
                rows[i] = recalibrate_layer(name, m, backend, method)
        for src in range(world):  # one broadcast per rank: [g, block...] of each of its layers
            mods = [layers[i][1] for i in plain if owner[i] == src]
            if not mods:
                continue
            sizes = [1 + m.block_amax.numel() for m in mods]
            if src == rank:
                flat = torch.cat(
                    [torch.cat([m.global_amax.reshape(1), m.block_amax.reshape(-1)]) for m in mods]
                )
            else:
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
            dist.broadcast(flat, src=src)
            if src != rank:
                for m, part in zip(mods, flat.split(sizes), strict=True):
                    m.global_amax.copy_(part[0])
                    m.block_amax.copy_(part[1:].reshape(m.block_amax.shape))
        gathered: list[dict[int, LayerRecalibration] | None] = [None] * world
        dist.all_gather_object(gathered, {i: r for i, r in rows.items() if not sharded[i]})
        for part in gathered:
            rows.update(part or {})
    return RecalibrationReport(
        layers=[rows[i] for i in range(len(layers))], seconds=time.perf_counter() - start
    )


class SplitRecalibration(NVFP4Recalibration):
    """:class:`~nvfp4_qat.NVFP4Recalibration` with :func:`recalibrate_split` in place of
    :func:`~nvfp4_qat.recalibrate` (``on_nonfinite`` other than ``"raise"`` is not supported)."""

    @override
    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        if self.on_nonfinite != "raise":
            raise ValueError(
                f"SplitRecalibration supports on_nonfinite='raise' only, got {self.on_nonfinite!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            return super()._recalibrate(trainer, pl_module, reason)
        start = time.perf_counter()
        report = recalibrate_split(pl_module, backend=self.backend, method=self.method)
        seconds = time.perf_counter() - start
        # The rest is the parent's bookkeeping and logging, unchanged.
        self._last_step = trainer.global_step
        self.last_report = report
        metrics = self._metrics(report, seconds)
        self.history.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "reason": reason, **metrics}
        )
        if self.log_per_layer:
            metrics.update(self._layer_metrics(report))
        for logger in trainer.loggers:
            logger.log_metrics({f"nvfp4/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
