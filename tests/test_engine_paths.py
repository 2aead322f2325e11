"""One recalibration engine: every execution path fills the same record and gives the same scales.

The paths: generic on the CPU (PyTorch reference sweep), generic through the Triton kernels and
fused (both under Triton's interpreter), and split across 2 gloo processes (DDP-style replicas,
generic and fused). The scales, the changed-block counts and the global amaxes are bit-identical;
the summed errors agree to fp32 rounding (a PyTorch sum and a kernel's per-program sums add the
same fp32 block losses in different orders).
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nvfp4_qat import NVFP4Linear, QATConfig, quantize_model, recalibrate
from nvfp4_qat.recalibration import LayerRecalibration, LayerStats, RecalibrationReport, resolve_plan

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


def _rank(rank: int, world: int, store_path: str, out_path: str, fused: bool) -> None:
    if fused:
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store)
    try:
        model = build("triton" if fused else "reference")
        report = recalibrate(model, backend="triton" if fused else "reference")
        result = {"report": report, "scales": scales(model)}
        if fused:  # every rank holds the kernel state of the new scales, installed (owner's bytes), not stale
            from nvfp4_qat.kernels.fake_quant import prepare

            layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
            result["states"] = [
                m._kernel_state_key is not None
                and m._kernel_state_key[2] == (m.block_amax._version, m.global_amax._version)
                and all(
                    torch.equal(a, b) for a, b in zip(m._kernel_state, prepare(m.block_amax, m.global_amax))
                )
                for m in layers
            ]
        # the checks: a weight changed on rank 1 only (diverged replicas), then a NaN on rank 1 only
        for case, spoil in (
            ("diverged", lambda w: w.mul_(1.0 + 2.0**-6)),
            ("nan", lambda w: w.fill_(float("nan"))),
        ):
            spoilt, before = build("triton" if fused else "reference"), None
            before = scales(spoilt)
            if rank == 1:
                with torch.no_grad():
                    spoil(spoilt[2].weight[0, :16])  # a layer rank 0 sweeps or rank 1 sweeps alike
            try:
                recalibrate(spoilt, backend="triton" if fused else "reference")
                result[case] = "returned"
            except (ValueError, RuntimeError) as err:
                result[case] = type(err).__name__
            result[case + "_unchanged"] = all(torch.equal(v, before[k]) for k, v in scales(spoilt).items())
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused"])
def test_two_gloo_ranks_agree_with_one_process(fused, tmp_path, monkeypatch):
    """The sweep split across 2 processes (each layer swept by one rank, its scales broadcast) gives
    every rank the one-process scales, bit for bit, and the same report."""
    ref, ref_scales = run_path("generic-reference", monkeypatch)
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), out, fused), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["report"].execution == ("distributed-fused" if fused else "distributed-generic")
        for k, v in ref_scales.items():
            assert torch.equal(got["scales"][k], v), (rank, k)
        assert_same(got["report"], ref)
        assert (got["diverged"], got["nan"]) == ("RuntimeError", "ValueError"), rank
        assert got.get("states", [True]) and all(got.get("states", [True])), (rank, got.get("states"))
        assert got["diverged_unchanged"] and got["nan_unchanged"], rank
    # the split is real: each rank swept a share (the seconds come from the owner)
    assert all(r.seconds > 0 for r in got["report"].layers)


def test_nvfp4_layer_config_carries_the_fake_quant_backend():
    layer = NVFP4Linear(32, 16, config=QATConfig(fake_quant_backend="reference"))
    assert layer.fake_quant_backend == "reference"
    layer.fake_quant_backend = "auto"
    assert (
        layer.config.fake_quant_backend == "auto" and layer.config.to_dict()["fake_quant_backend"] == "auto"
    )
