"""NVFP4Recalibration and recalibrate_distributed with 2 CPU processes (gloo): DDP and FSDP2.

Each rank trains on its own batches; after every recalibration a recording callback compares the
rank's scale buffers with rank 0's (broadcast) and with a fresh sweep of the full weight (gathered
from the FSDP2 shards), and notes which weights (shapes) this rank swept: under DDP each layer is
swept by exactly one rank, under FSDP2 each rank sweeps its own rows. The run must finish within a
deadline with the callback's metrics in the CSV logger's file: logging from every rank with writes
on rank 0 only must not deadlock. The DDP run exports at fit end (rank 0 writes, every rank waits);
FSDP2 with ``export_path`` is refused. Then ``recalibrate_distributed`` is called directly on
replicated and on sharded layers (uneven shards, an empty shard, a column-sharded weight) with
non-finite weights that only one rank sees, against a one-process ``recalibrate``.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import time
import warnings
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

from nvfp4_qat import NVFP4Recalibration, fake_quantize_nvfp4, load_nvfp4, nvfp4_scale_sweep, quantize_model
from nvfp4_qat.policy import InputMoments
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.recalibration import _execute, layer_owners, recalibrate, recalibrate_distributed

pytestmark = pytest.mark.slow  # about 35 s on 2 cores, most of it importing torch and Lightning twice

WORLD = 2
STEPS = 6  # recalibrations at fit start and after optimizer steps 2, 4, 6
DEADLINE_S = 150  # a deadlock fails the test after this; the run takes 30-45 s on 2 cores
SWEPT: list[tuple[int, ...]] = []  # shapes of the weights this process swept since last looked at


def _record_sweeps() -> None:
    """Every CPU sweep (whole weights or row shards) goes through ``_execute._sweep_one``: note the
    shapes of the weights it gets."""

    def recording(task, *args, real=_execute._sweep_one):
        SWEPT.append(tuple(task.weight.shape))
        return real(task, *args)

    _execute._sweep_one = recording


def _take_swept() -> list[tuple[int, ...]]:
    out = sorted(SWEPT)
    SWEPT.clear()
    return out


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
    """After each recalibration: (step, equal to rank 0's, equal to a fresh sweep, the scales, the
    shapes this rank swept)."""

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
        self.records.append((trainer.global_step, torch.equal(mine, rank0), all(swept), mine, _take_swept()))


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip  # LOCAL_RANK set: Lightning joins these processes instead of launching its own
    torch.set_num_threads(1)
    _record_sweeps()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 4 * WORLD, 32, generator=gen)
    data = TensorDataset(x, torch.tanh(x @ torch.randn(32, 32, generator=gen)))
    out = {}
    for name, strategy in (
        ("ddp", "ddp"),
        ("fsdp2", ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)),
    ):
        export = Path(tmp) / f"export_{name}" if name == "ddp" else None  # rank 0 writes, all wait
        recal = NVFP4Recalibration(
            policy="mse", settle_fraction=0.0, every_n_train_steps=2, log_per_layer=True, export_path=export
        )
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
    recal = NVFP4Recalibration(policy="mse", settle_fraction=0.0, export_path=Path(tmp) / "export_fsdp2")
    try:
        _trainer(strategy, [recal], False).fit(Regressor(fsdp=True), DataLoader(data, 4))
    except ValueError as err:
        out["fsdp2_export_error"] = str(err)
    out["direct"] = _direct_calls(rank)
    out["policy"] = _policy_calls(rank)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


def _layers() -> nn.ModuleDict:
    """Quantized (max init) layers whose scales are stale: the weights moved since."""
    torch.manual_seed(3)
    m = nn.ModuleDict(
        {"a": nn.Linear(32, 64), "b": nn.Linear(48, 33), "c": nn.Linear(16, 1), "d": nn.Linear(64, 40)}
    )
    quantize_model(m, init_calibration="max")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.3).add_(0.01)
    return m


def _shard(m: nn.ModuleDict) -> nn.ModuleDict:
    """FSDP2 on a, b (33 rows: 17 + 16) and c (1 row: rank 1 holds none); d column-sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for name in "abc":
        fully_shard(m[name], mesh=mesh)
    m["d"].weight = nn.Parameter(distribute_tensor(m["d"].weight.detach(), mesh, [Shard(1)]))
    return m


def _scales(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if k.endswith(("block_amax", "global_amax"))}


def _direct_calls(rank: int) -> dict:
    """recalibrate_distributed on replicated and on sharded layers, against one-process recalibrate."""
    reference = _layers()
    ref_report = recalibrate(reference, distributed=False)
    out = {"reference": _scales(reference), "ref_rows": ref_report.layers}
    for layout, make in (("replicated", _layers), ("sharded", lambda: _shard(_layers()))):
        m = make()
        _take_swept()
        report = recalibrate_distributed(m)
        out[layout] = {"scales": _scales(m), "rows": report.layers, "swept": _take_swept()}
        # A NaN only this rank can see: b's rank-1 owner (replicated) or b's rank-1 rows (sharded).
        for policy in ("raise", "skip"):
            m = make()
            before = _scales(m)
            if rank == 1:
                with torch.no_grad():
                    w = m["b"].weight
                    (w.to_local() if layout == "sharded" else w)[-1, -1] = float("nan")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    report = recalibrate_distributed(m, on_nonfinite=policy)
                    result = [r.name for r in report.layers if r.skipped]
                except ValueError as err:
                    result = str(err)
            out[layout][policy] = {
                "result": result,
                "before": before,
                "after": _scales(m),
                "warnings": [str(w.message) for w in caught if "non-finite" in str(w.message)],
            }
    out["replicated"]["foreign_nan"] = _try_replicated(
        rank, lambda m: m["d"].weight[0, 0].fill_(float("nan"))
    )
    out["replicated"]["diverged"] = _try_replicated(rank, lambda m: [p.mul_(1.5) for p in m.parameters()])
    return out


def _policy_calls(rank: int) -> dict:
    """A policy other than the plain sweep under DDP: each rank sees other inputs; the activation
    statistics are summed over the ranks and every rank computes the same scales, equal to one
    process that saw both ranks' inputs. The loss check decides on the loss averaged over ranks."""

    def feed(m: nn.ModuleDict, r: int) -> None:
        g = torch.Generator().manual_seed(100 + r)
        for layer in m.values():
            layer(torch.randn(8, layer.in_features, generator=g) * (1 + r))

    m = _layers()
    moments = InputMoments(list(m.items()))
    feed(m, rank)
    recalibrate_distributed(m, policy="activation", input_moments=moments)
    ref = _layers()
    ref_moments = InputMoments(list(ref.items()))
    feed(ref, 0)
    feed(ref, 1)
    recalibrate(ref, policy="activation", input_moments=ref_moments, distributed=False)

    def mean_loss() -> float:  # rank-dependent, averaged: every rank sees the same number
        local = torch.tensor(float(sum(float(v.block_amax.sum()) for v in checked.values())) * (1 + rank))
        dist.all_reduce(local)
        return float(local) / 2

    checked = _layers()
    report = recalibrate_distributed(checked, policy="loss_check_layer", evaluate=mean_loss)
    return {
        "activation": _scales(m),
        "activation_reference": _scales(ref),
        "loss_check": _scales(checked),
        "rolled_back_layers": report.rolled_back_layers,
    }


def _try_replicated(rank: int, spoil) -> dict:
    """recalibrate_distributed on replicated layers that ``spoil`` changed on rank 1 only."""
    m = _layers()
    before = _scales(m)
    if rank == 1:
        with torch.no_grad():
            spoil(m)
    try:
        recalibrate_distributed(m)
        result = "returned"
    except (ValueError, RuntimeError) as err:
        result = f"{type(err).__name__}: {err}"
    return {"result": result, "unchanged": all(torch.equal(v, before[k]) for k, v in _scales(m).items())}


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
        for step, same_as_rank0, same_as_sweep, _, _ in records:
            assert same_as_rank0, f"rank {rank} step {step}: scales differ from rank 0's"
            assert same_as_sweep, f"rank {rank} step {step}: scales differ from a sweep of the full weight"
    for (step, _, _, s0, _), (_, _, _, s1, _) in zip(
        ranks[0][strategy]["records"], ranks[1][strategy]["records"], strict=True
    ):
        n_diff = int((s0 != s1).sum())
        assert n_diff == 0, f"step {step}: {n_diff} scale values differ between the ranks"
    # The scales follow the weights: training moved them between the first and the last recalibration.
    first, last = ranks[0][strategy]["records"][0][3], ranks[0][strategy]["records"][-1][3]
    assert not torch.equal(first, last)


def test_ddp_each_layer_is_swept_by_exactly_one_rank(runs):
    _, ranks = runs
    shapes = [(64, 32), (48, 64), (32, 48)]  # net.0, net.2, net.4
    owners = layer_owners([r * c for r, c in shapes], WORLD)
    assert owners == [1, 0, 1]  # largest (net.2) to rank 0, then rank 1 takes the other two
    for k in range(4):  # fit start and steps 2, 4, 6
        swept = [ranks[r]["ddp"]["records"][k][4] for r in range(WORLD)]
        for r in range(WORLD):
            assert swept[r] == sorted(s for s, o in zip(shapes, owners, strict=True) if o == r), (k, r)
        assert sorted(swept[0] + swept[1]) == sorted(shapes)  # every layer once, none twice


def test_fsdp2_each_rank_sweeps_its_own_rows(runs):
    _, ranks = runs
    for k in range(4):
        for r in range(WORLD):  # half the rows of each of the three weights, never a full weight
            assert ranks[r]["fsdp2"]["records"][k][4] == [(16, 48), (24, 64), (32, 32)], (k, r)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_metrics_are_logged_by_rank_zero(runs, strategy):
    tmp, _ = runs
    with open(tmp / strategy / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("nvfp4/mse_after")]
    # fit start, then after optimizer steps 2, 4, 6 on Lightning's step index of that point (n - 1)
    assert [int(r["step"]) for r in logged] == [0, 1, 3, 5]
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


# --- recalibrate_distributed called directly -------------------------------------------------------


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_direct_scales_and_report_equal_one_process_recalibrate(runs, layout):
    _, ranks = runs
    ref = ranks[0]["direct"]["reference"]
    for rank, out in enumerate(ranks):
        got = out["direct"][layout]["scales"]
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            n_diff = int((got[k] != v).sum())
            assert n_diff == 0, f"rank {rank} {layout} {k}: {n_diff} values differ from recalibrate()"
        for row, ref_row in zip(out["direct"][layout]["rows"], out["direct"]["ref_rows"], strict=True):
            assert (row.name, row.numel, row.changed_fraction, row.skipped) == (
                ref_row.name, ref_row.numel, ref_row.changed_fraction, False,
            )  # fmt: skip
            assert (row.global_amax_before, row.global_amax_after) == (
                ref_row.global_amax_before, ref_row.global_amax_after,
            )  # fmt: skip
            assert 0 < row.changed_fraction and row.mse_after < row.mse_before
            for field in ("sse_before", "sse_after", "energy"):  # row shards sum in another order
                assert math.isclose(getattr(row, field), getattr(ref_row, field), rel_tol=1e-6), field
    # one report for all: the statistics are reduced, times included
    assert ranks[0]["direct"][layout]["rows"] == ranks[1]["direct"][layout]["rows"]


def test_direct_replicated_layers_are_split_by_owner(runs):
    _, ranks = runs
    shapes = {"a": (64, 32), "b": (33, 48), "c": (1, 16), "d": (40, 64)}
    owners = layer_owners([r * c for r, c in shapes.values()], WORLD)
    assert owners == [1, 1, 0, 0]
    for r in range(WORLD):
        mine = sorted(s for s, o in zip(shapes.values(), owners, strict=True) if o == r)
        assert ranks[r]["direct"]["replicated"]["swept"] == mine


def test_direct_sharded_layers_sweep_local_rows_and_gather_other_layouts(runs):
    _, ranks = runs
    # a: 64 rows -> 32 + 32; b: 33 -> 17 + 16; c: 1 -> 1 + 0 (no sweep); d: Shard(1), gathered whole
    assert ranks[0]["direct"]["sharded"]["swept"] == [(1, 16), (17, 48), (32, 32), (40, 64)]
    assert ranks[1]["direct"]["sharded"]["swept"] == [(16, 48), (32, 32), (40, 64)]


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_direct_nonfinite_weight_seen_by_one_rank(runs, layout):
    """Rank 1 alone holds the NaN (it owns b, or b's last rows): both ranks act together."""
    _, ranks = runs
    ref = ranks[0]["direct"]["reference"]
    for rank, out in enumerate(ranks):
        raised, skipped = out["direct"][layout]["raise"], out["direct"][layout]["skip"]
        assert "non-finite (NaN/Inf) weights in layer 'b'; no scale was changed" in raised["result"], rank
        for k, v in raised["before"].items():
            assert torch.equal(raised["after"][k], v), (rank, k)
        assert skipped["result"] == ["b"], rank
        for k, v in skipped["after"].items():
            expected = skipped["before"][k] if k.startswith("b.") else ref[k]
            assert torch.equal(v, expected), (rank, k)
        expected_warnings = ["recalibrate skipped 1 layer(s) with non-finite weights, scales kept: ['b']"]
        assert skipped["warnings"] == (expected_warnings if rank == 0 else []), rank


def test_direct_nan_in_a_layer_another_rank_owns_makes_every_rank_raise(runs):
    """Issue 13: a NaN only on rank 1 in layer d, which rank 0 sweeps, returned normally on both."""
    _, ranks = runs
    for rank, out in enumerate(ranks):
        got = out["direct"]["replicated"]["foreign_nan"]
        assert got["result"].startswith("ValueError: non-finite (NaN/Inf) weights in layer 'd'"), rank
        assert got["unchanged"], rank


def test_direct_diverged_replicas_make_every_rank_raise(runs):
    """Issue 13: rank 1's weights scaled by 1.5 went unnoticed, each rank taking the other's scales."""
    _, ranks = runs
    for rank, out in enumerate(ranks):
        got = out["direct"]["replicated"]["diverged"]
        assert got["result"].startswith(
            "RuntimeError: replicated weights differ between ranks in 4 layer(s), e.g. ['a', 'b', 'c', 'd']"
        ), (rank, got["result"])
        assert got["unchanged"], rank


def test_policies_under_ddp_give_the_same_scales_on_every_rank(runs):
    _, ranks = runs
    first, second = ranks[0]["policy"], ranks[1]["policy"]
    for k, v in first["activation_reference"].items():
        for rank, got in enumerate((first["activation"], second["activation"])):
            assert torch.equal(got[k], v), f"rank {rank} {k}: activation scales differ from one process"
    assert first["rolled_back_layers"] == second["rolled_back_layers"]
    for k, v in first["loss_check"].items():
        assert torch.equal(second["loss_check"][k], v), k
