"""NVFP4Recalibration with 2 CPU processes (gloo): DDP and FSDP2 (``ModelParallelStrategy``).

Each rank trains on its own batches; after every recalibration a recording callback compares the
rank's scale buffers with rank 0's (broadcast) and with a fresh sweep of the full weight (gathered
from the FSDP2 shards). The run must finish within a deadline with the callback's metrics in the
CSV logger's file: logging from every rank with writes on rank 0 only must not deadlock. The DDP
run exports at fit end (rank 0 writes, every rank waits); FSDP2 with ``export_path`` is refused.
"""

from __future__ import annotations

import csv
import os
import socket
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from nvfp4_qat import NVFP4Recalibration, fake_quantize_nvfp4, load_nvfp4, nvfp4_scale_sweep
from nvfp4_qat.quantize import nvfp4_layers

pytestmark = pytest.mark.slow  # about 45 s on 2 cores, most of it importing torch and Lightning twice

WORLD = 2
STEPS = 6  # recalibrations at fit start and after optimizer steps 2, 4, 6
DEADLINE_S = 150  # a deadlock fails the test after this; the run takes 30-45 s on 2 cores


class Regressor(pl.LightningModule):
    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on both ranks
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)
        )
        self.fsdp = fsdp

    def configure_model(self) -> None:
        if self.fsdp and not isinstance(self.net[0].weight, DTensor):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2], self.net[4]):
                fully_shard(layer, mesh=mesh)  # rows split across the ranks, scales stay whole
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RecordScales(Callback):
    """After each recalibration: (step, equal to rank 0's, equal to a fresh sweep, the scales)."""

    def __init__(self, recal: NVFP4Recalibration) -> None:
        self.recal, self.seen, self.records = recal, 0, []

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)

    @torch.no_grad()
    def _record(self, trainer, pl_module) -> None:
        if len(self.recal.history) == self.seen:
            return
        self.seen = len(self.recal.history)
        layers = [m for _, m in nvfp4_layers(pl_module)]
        mine = torch.cat([torch.cat([m.global_amax.reshape(1), m.block_amax.reshape(-1)]) for m in layers])
        rank0 = mine.clone()
        dist.broadcast(rank0, src=0)
        swept = []
        for m in layers:
            w = m.weight.detach()
            w = w.full_tensor() if isinstance(w, DTensor) else w
            g = w.abs().max().float()
            swept.append(
                torch.equal(g, m.global_amax)
                and torch.equal(nvfp4_scale_sweep(w, g), m.block_amax.reshape(-1))
            )
        self.records.append((trainer.global_step, torch.equal(mine, rank0), all(swept), mine))


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip  # LOCAL_RANK set: Lightning joins these processes instead of launching its own
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 4 * WORLD, 32, generator=gen)
    data = TensorDataset(x, torch.tanh(x @ torch.randn(32, 32, generator=gen)))
    out = {}
    for name, strategy in (
        ("ddp", "ddp"),
        ("fsdp2", ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)),
    ):
        export = Path(tmp) / f"export_{name}" if name == "ddp" else None  # rank 0 writes, all wait
        recal = NVFP4Recalibration(every_n_train_steps=2, log_per_layer=True, export_path=export)
        record = RecordScales(recal)
        model = Regressor(fsdp=name == "fsdp2")
        _trainer(strategy, [recal, record], CSVLogger(tmp, name=name, version=0)).fit(
            model, DataLoader(data, 4)
        )
        out[name] = {"records": record.records, "history": [h["step"] for h in recal.history]}
        if export is not None and rank == 0:
            loaded = load_nvfp4(export)
            out[name]["export_equal"] = [
                torch.equal(
                    loaded[f"{n}.weight"], fake_quantize_nvfp4(m.weight.detach(), m.block_amax, m.global_amax)
                )
                for n, m in nvfp4_layers(model)
            ]
    # FSDP2 shards cannot be exported by rank zero alone: refused on every rank before training.
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    recal = NVFP4Recalibration(export_path=Path(tmp) / "export_fsdp2")
    try:
        _trainer(strategy, [recal], False).fit(Regressor(fsdp=True), DataLoader(data, 4))
    except ValueError as err:
        out["fsdp2_export_error"] = str(err)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


def _trainer(strategy, callbacks: list, logger) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, callbacks=callbacks, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("distributed")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the 2-process run did not finish in {DEADLINE_S} s (deadlock?)")
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_scales_identical_on_all_ranks_after_each_recalibration(runs, strategy):
    _, ranks = runs
    for rank, out in enumerate(ranks):
        records = out[strategy]["records"]
        assert [r[0] for r in records] == [0, 2, 4, 6], f"rank {rank}"
        assert out[strategy]["history"] == [0, 2, 4, 6], f"rank {rank}"
        for step, same_as_rank0, same_as_sweep, _ in records:
            assert same_as_rank0, f"rank {rank} step {step}: scales differ from rank 0's"
            assert same_as_sweep, f"rank {rank} step {step}: scales differ from a sweep of the full weight"
    for (step, _, _, s0), (_, _, _, s1) in zip(
        ranks[0][strategy]["records"], ranks[1][strategy]["records"], strict=True
    ):
        n_diff = int((s0 != s1).sum())
        assert n_diff == 0, f"step {step}: {n_diff} scale values differ between the ranks"
    # The scales follow the weights: training moved them between the first and the last recalibration.
    first, last = ranks[0][strategy]["records"][0][3], ranks[0][strategy]["records"][-1][3]
    assert not torch.equal(first, last)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_metrics_are_logged_by_rank_zero(runs, strategy):
    tmp, _ = runs
    with open(tmp / strategy / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("nvfp4/mse_after")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4, 6]
    for r in logged:  # every rank computed them; one row per recalibration, written by rank 0
        assert 0 < float(r["nvfp4/mse_after"]) < 1e-2
        assert 0 <= float(r["nvfp4/changed_fraction"]) <= 1
        assert float(r["nvfp4/layer/net_4/mse_after"]) > 0


def test_ddp_export_is_written_by_rank_zero_with_the_final_scales(runs):
    _, ranks = runs
    assert ranks[0]["ddp"]["export_equal"] == [True, True, True]


def test_fsdp2_export_path_is_refused_before_training_on_every_rank(runs):
    _, ranks = runs
    for out in ranks:
        assert "`export_path` is not supported with FSDP2" in out["fsdp2_export_error"]
