"""One recalibration engine: every execution path fills the same record and gives the same scales.

The paths: generic on the CPU (PyTorch reference sweep), generic through the Triton kernels and
fused (both under Triton's interpreter), and split across 2 gloo processes (DDP-style replicas,
generic and fused). The scales, the changed-block counts and the global amaxes are bit-identical;
the summed errors agree to fp32 rounding (a PyTorch sum and a kernel's per-program sums add the
same fp32 block losses in different orders).
"""

import dataclasses
import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nvfp4_qat import NVFP4Linear, QATConfig, quantize_model, recalibrate
from nvfp4_qat.recalibration import (
    LayerRecalibration,
    LayerStats,
    RecalibrationReport,
    _distributed,
    layer_owners,
    resolve_plan,
)

EXACT = ("name", "numel", "changed_fraction", "global_amax_before", "global_amax_after", "skipped")
SUMS = ("sse_before", "sse_after", "energy", "mse_before", "mse_after")


def build(fake_quant_backend: str = "reference") -> nn.Module:
    """Three layers, two dtypes, odd block counts; weights moved after the max calibration."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 80), nn.Linear(80, 32), nn.Linear(32, 16))
    model[1].to(torch.bfloat16)
    quantize_model(
        model, QATConfig(init_calibration="max", backend="reference", fake_quant_backend=fake_quant_backend)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.25).add_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))
    return model


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("block_amax", "global_amax"))}


def assert_same(report: RecalibrationReport, ref: RecalibrationReport) -> None:
    assert len(report.layers) == len(ref.layers)
    for row, want in zip(report.layers, ref.layers, strict=True):
        assert isinstance(row, LayerRecalibration)
        for field in EXACT:
            assert getattr(row, field) == getattr(want, field), (row.name, field)
        for field in SUMS:
            assert math.isclose(getattr(row, field), getattr(want, field), rel_tol=2e-6), (row.name, field)
    assert report.n_changed == ref.n_changed > 0


def run_path(path: str, monkeypatch) -> tuple[RecalibrationReport, dict]:
    if path != "generic-reference":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = build("triton" if path == "fused" else "reference")
    backend = "reference" if path == "generic-reference" else "triton"
    report = recalibrate(model, backend=backend)
    return report, scales(model)


@pytest.mark.parametrize("path", ["generic-triton", "fused"])
def test_paths_in_one_process_agree(path, monkeypatch):
    ref, ref_scales = run_path("generic-reference", monkeypatch)
    assert (ref.execution, ref.backend, ref.fake_quant_backend) == ("generic", "reference", "reference")
    report, got = run_path(path, monkeypatch)
    want = ("fused", "triton", "triton") if path == "fused" else ("generic", "triton", "reference")
    assert (report.execution, report.backend, report.fake_quant_backend) == want
    for k, v in ref_scales.items():
        assert torch.equal(got[k], v), k
    assert_same(report, ref)
    assert f"[{want[0]}, sweep triton]" in str(report).splitlines()[0]


def test_plan_is_resolved_once_and_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build()
    plan = resolve_plan(model, "auto", "pruned", "raise", "mse", None)
    assert (plan.execution, plan.backend, plan.world, plan.label) == ("generic", "reference", 1, "generic")
    assert resolve_plan(model, "auto", "pruned", "raise", "activation", None).execution == "policy"
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor"):
        resolve_plan(model, "triton", "pruned", "raise", "mse", None)
    with pytest.raises(TypeError, match="distributed must be None"):
        resolve_plan(model, "auto", "pruned", "raise", "mse", "yes")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model[0].fake_quant_backend = "triton"  # one layer's fake-quant on the kernel, the others not:
    plan = resolve_plan(model, "triton", "pruned", "raise", "mse", None)
    assert (plan.execution, plan.fake_quant_backend) == ("generic", "mixed")  # no fused path


def test_record_fields_name_the_measurements():
    assert LayerStats._fields == (
        "sse_before",
        "sse_after",
        "n_changed",
        "energy",
        "amax_before",
        "amax_after",
    )
    stats = LayerStats(*(torch.tensor([float(i), 10.0 + i]) for i in range(6)))
    back = LayerStats.from_tensor(stats.to_tensor())
    assert all(torch.equal(a.double(), b) for a, b in zip(stats, back, strict=True))
    row = LayerRecalibration.from_stats("l", 64, LayerStats(8.0, 4.0, 1.0, 32.0, 2.0, 3.0), 0.5)
    assert (row.mse_before, row.mse_after, row.changed_fraction, row.global_amax_after) == (
        0.125,
        0.0625,
        0.25,
        3.0,
    )
    # from_stats fills the row without __init__: the same row, equal, hash-equal and still frozen
    made = LayerRecalibration(
        "l", 64, 8.0, 4.0, 0.125, 0.0625, 0.25, 2.0, 3.0, 0.5, skipped=False, energy=32.0
    )
    assert row == made and hash(row) == hash(made) and dataclasses.asdict(row) == dataclasses.asdict(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.sse_after = 0.0


def _rank(rank: int, world: int, store_path: str, out_path: str, fused: bool, single: bool) -> None:
    if fused:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    # a rank left waiting in a collective fails after this instead of hanging the test
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store, timeout=timedelta(seconds=90))
    backend = "triton" if fused else "reference"
    try:
        if single:  # one layer for two ranks: rank 1 sweeps nothing but takes part in every exchange
            model = build(backend)[2:]
            result = {"report": recalibrate(model, backend=backend), "scales": scales(model)}
            torch.save(result, f"{out_path}.{rank}")
            return
        swept = []
        real = _distributed.sweep
        _distributed.sweep = lambda tasks, *a: (
            swept.append([tuple(t.weight.shape) for t in tasks]) or real(tasks, *a)
        )
        model = build(backend)
        report = recalibrate(model, backend=backend)
        _distributed.sweep = real
        result = {"report": report, "scales": scales(model), "swept": swept[0]}
        if fused:  # every rank holds the kernel state of the new scales, installed (owner's bytes), not stale
            from nvfp4_qat.kernels.fake_quant import prepare

            layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
            result["states"] = [
                m._kernel_state_key is not None
                and m._kernel_state_key[2] == (m.block_amax._version, m.global_amax._version)
                and all(
                    torch.equal(a, b)
                    for a, b in zip(m._kernel_state, prepare(m.block_amax, m.global_amax), strict=True)
                )
                for m in layers
            ]
        # The checks, on rank 1 only: layer 0 is swept by rank 0, layer 2 by rank 1 (layer_owners).
        # "diverged": rank 1's weights and scales of layer 0 differ (a checkpoint loaded on one rank);
        # every rank must raise and keep its own scales. "nan": a NaN in a replica rank 1 does not
        # sweep, and in one it does.
        for case, layer, spoil in (
            ("diverged", 0, lambda m: (m.weight[0, :16].mul_(1.0 + 2.0**-6), m.block_amax.mul_(2.0))),
            ("nan", 0, lambda m: m.weight[0, :16].fill_(float("nan"))),
            ("nan_owned", 2, lambda m: m.weight[0, :16].fill_(float("nan"))),
        ):
            spoilt = build(backend)
            if rank == 1:
                with torch.no_grad():
                    spoil(spoilt[layer])
            before = scales(spoilt)
            try:
                recalibrate(spoilt, backend=backend)
                result[case] = "returned"
            except (ValueError, RuntimeError) as err:
                result[case] = type(err).__name__
            result[case + "_unchanged"] = all(torch.equal(v, before[k]) for k, v in scales(spoilt).items())
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, fused: bool, single: bool) -> list[dict]:
    out = str(tmp_path / "result")
    ctx = mp.spawn(_rank, args=(2, str(tmp_path / "store"), out, fused, single), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2 ranks did not finish: a collective hangs")
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_two_gloo_ranks_agree_with_one_process(fused, tmp_path, monkeypatch):
    """The sweep split across 2 processes (each layer swept by one rank, its scales broadcast) gives
    every rank the one-process scales, bit for bit, and the same report; the checks raise on every
    rank and change nothing."""
    ref, ref_scales = run_path("generic-reference", monkeypatch)
    results = _spawn(tmp_path, fused, single=False)
    owners = layer_owners([48 * 80, 80 * 32, 32 * 16], 2)
    assert owners == [0, 1, 1]
    shapes = [(80, 48), (32, 80), (16, 32)]
    for rank, got in enumerate(results):
        assert got["report"].execution == ("distributed-fused" if fused else "distributed-generic")
        assert got["swept"] == [s for s, o in zip(shapes, owners, strict=True) if o == rank], (
            rank
        )  # the split
        for k, v in ref_scales.items():
            assert torch.equal(got["scales"][k], v), (rank, k)
        assert_same(got["report"], ref)
        assert (got["diverged"], got["nan"], got["nan_owned"]) == ("RuntimeError", "ValueError", "ValueError")
        assert got["diverged_unchanged"] and got["nan_unchanged"] and got["nan_owned_unchanged"], rank
        if fused:
            assert got["states"] == [True, True, True], rank


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_a_rank_with_nothing_to_sweep_still_exchanges(fused, tmp_path, monkeypatch):
    """One layer, two ranks: the rank that owns nothing joins every collective (no hang) and ends
    with the owner's scales."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref_model = build("reference")[2:]
    ref = recalibrate(ref_model, backend="reference")
    for got in _spawn(tmp_path, fused, single=True):
        for k, v in scales(ref_model).items():
            assert torch.equal(got["scales"][k], v), k
        assert_same(got["report"], ref)


def test_nvfp4_layer_config_carries_the_fake_quant_backend():
    layer = NVFP4Linear(32, 16, config=QATConfig(fake_quant_backend="reference"))
    assert layer.fake_quant_backend == "reference"
    layer.fake_quant_backend = "auto"
    assert (
        layer.config.fake_quant_backend == "auto" and layer.config.to_dict()["fake_quant_backend"] == "auto"
    )
