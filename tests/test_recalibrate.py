"""recalibrate(): in-place scales equal to the sweep, report values, non-finite policy, no autograd;
the helpers it shares with recalibrate_distributed."""

import itertools
import math

import pytest
import torch
from torch import nn

from nvfp4_qat import (
    NVFP4Linear,
    RecalibrationReport,
    fake_quantize_nvfp4,
    nvfp4_scale_sweep,
    quantize_model,
    recalibrate,
)
from nvfp4_qat.format import block_codes, global_scale
from nvfp4_qat.recalibration import _execute, layer_owners, recalibrate_distributed, weight_sse


def prepared(seed=0, dtype=torch.float32, init="max") -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.Linear(48, 16)).to(dtype)
    return quantize_model(model, init_calibration=init)


def drift(model: nn.Module, seed=1) -> None:
    """Move the weights the way training would, so that the scales go stale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2).add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def manual_sse(w, block, g) -> float:
    """The reported error: the NVFP4 value in fp32 (before any cast to the weight's dtype) vs w."""
    wf = w.float()
    return float((fake_quantize_nvfp4(wf, block, g) - wf).square().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scales_written_in_place_equal_the_sweep(dtype):
    model = prepared(dtype=dtype)
    drift(model)
    layers = [model[0], model[2], model[3]]
    ptrs = [(m.block_amax.data_ptr(), m.global_amax.data_ptr()) for m in layers]
    buffers = [(m.block_amax, m.global_amax) for m in layers]
    recalibrate(model)
    for m, ptr, (block, g) in zip(layers, ptrs, buffers, strict=True):
        assert (m.block_amax.data_ptr(), m.global_amax.data_ptr()) == ptr
        assert m.block_amax is block and m.global_amax is g  # same tensors, same storage
        w = m.weight.detach()
        assert torch.equal(m.global_amax, w.float().abs().amax())
        assert torch.equal(m.block_amax.reshape(-1), nvfp4_scale_sweep(w, w.float().abs().amax()))


def test_report_rows_and_totals():
    model = prepared(init="max")
    drift(model)
    stale = {
        name: (m.block_amax.clone(), m.global_amax.clone())
        for name, m in model.named_children()
        if hasattr(m, "block_amax")
    }
    report = recalibrate(model)
    assert isinstance(report, RecalibrationReport)
    assert [r.name for r in report.layers] == ["0", "2", "3"]
    sse_b = sse_a = changed = blocks = numel = 0
    for row in report.layers:
        m = model.get_submodule(row.name)
        w = m.weight.detach()
        old_block, old_g = stale[row.name]
        assert row.numel == w.numel() and not row.skipped and row.seconds > 0
        assert math.isclose(row.sse_before, manual_sse(w, old_block, old_g), rel_tol=1e-6)
        assert math.isclose(row.sse_after, manual_sse(w, m.block_amax, m.global_amax), rel_tol=1e-6)
        assert row.mse_before == row.sse_before / row.numel and row.mse_after == row.sse_after / row.numel
        assert row.sse_after < row.sse_before  # stale max scales vs fresh MSE-optimal ones
        moved = block_codes(m.block_amax, global_scale(m.global_amax)) != block_codes(
            old_block, global_scale(old_g)
        )
        assert row.changed_fraction == int(moved.sum()) / moved.numel()
        assert row.global_amax_before == float(old_g) and row.global_amax_after == float(m.global_amax)
        sse_b, sse_a = sse_b + row.sse_before, sse_a + row.sse_after
        changed, blocks, numel = changed + int(moved.sum()), blocks + moved.numel(), numel + row.numel
    assert 0 < changed < blocks
    assert report.numel == numel and report.n_blocks == blocks
    assert math.isclose(report.mse_before, sse_b / numel) and math.isclose(report.mse_after, sse_a / numel)
    assert math.isclose(report.changed_fraction, changed / blocks)
    text = str(report)
    assert "NVFP4 recalibration: 3 layers (0 skipped)" in text and text.splitlines()[-1].startswith("total")
    assert f"{report.mse_after:.4e}" in text


def test_second_recalibration_changes_nothing():
    model = prepared(init="mse")
    report = recalibrate(model)
    assert report.changed_fraction == 0.0 and report.mse_before == report.mse_after


def test_weight_sse_matches_the_definition():
    model = prepared(dtype=torch.bfloat16)
    sse, numel = weight_sse(model[2])
    assert sse.dtype == torch.float32 and sse.shape == () and numel == 64 * 48
    w = model[2].weight.detach()
    assert float(sse) == manual_sse(w, model[2].block_amax, model[2].global_amax)
    # not the error of the bf16 forward weight, which rounds the NVFP4 value once more
    rounded = float(
        (fake_quantize_nvfp4(w, model[2].block_amax, model[2].global_amax).float() - w.float()).square().sum()
    )
    assert float(sse) != rounded


def test_no_autograd_or_optimizer_side_effects():
    model = prepared()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 32)).square().sum().backward()
    opt.step()
    drift(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    recalibrate(model)
    assert torch.is_grad_enabled()
    for n, p in model.named_parameters():
        assert p.requires_grad and torch.equal(p.grad, grads[n]) and torch.equal(p, weights[n]), n
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, state[k]), k
    assert not any(m.block_amax.requires_grad for m in (model[0], model[2], model[3]))


@pytest.fixture(params=["generic", "fused"])
def recal(request, monkeypatch):
    """``recalibrate`` on the generic path (PyTorch), or on the GPU fast path (the Triton kernels,
    here under the interpreter), which queues every layer before it knows which weights are finite."""
    if request.param == "generic":
        yield recalibrate
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls, real = [], _execute._sweep_fused
    monkeypatch.setattr(_execute, "_sweep_fused", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(model, **kwargs):
        for m in model.modules():
            if isinstance(m, NVFP4Linear):
                m.fake_quant_backend = "triton"
        report = recalibrate(model, backend="triton", **kwargs)
        assert report.execution == "fused" and report.backend == "triton"
        return report

    yield run
    assert calls, "the fused path was not taken"


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_weights(policy, recal):
    model = prepared()
    drift(model)
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
        model[3].weight[0, 0] = float("-inf") if policy == "raise" else model[3].weight[0, 0]
    before = {k: v.clone() for k, v in model.state_dict().items() if "amax" in k}
    if policy == "raise":
        with pytest.raises(ValueError, match="non-finite .* in layer '2' and 1 more; no scale was changed"):
            recal(model, on_nonfinite=policy)
        for k, v in model.state_dict().items():  # not even the finite layer '0' before it moved
            if "amax" in k:
                assert torch.equal(v, before[k]), k
        return
    with pytest.warns(UserWarning, match=r"skipped 1 layer\(s\) with non-finite weights.*\['2'\]"):
        report = recal(model, on_nonfinite=policy)
    rows = {r.name: r for r in report.layers}
    assert rows["2"].skipped and math.isnan(rows["2"].mse_after) and not rows["0"].skipped
    assert torch.equal(model[2].block_amax, before["2.block_amax"])
    assert not torch.equal(model[0].block_amax, before["0.block_amax"])
    assert report.n_skipped == 1 and report.numel == 32 * 64 + 48 * 16 and math.isfinite(report.mse_after)
    assert "skipped: non-finite weights" in str(report)


def test_garbage_stale_scales_and_huge_finite_weights_are_recalibrated(recal):
    model = prepared()
    model[0].block_amax.fill_(float("nan"))  # e.g. uninitialised buffers after to_empty()
    with torch.no_grad():
        model[2].weight.mul_(1e19)  # finite, but squared errors overflow fp32: the SSE is Inf
    report = recal(model)
    rows = {r.name: r for r in report.layers}
    assert report.n_skipped == 0
    # a NaN block amax gives FP8 code 0 (format.block_codes): the stale error is that of all zeros
    assert math.isclose(rows["0"].sse_before, float(model[0].weight.detach().square().sum()), rel_tol=1e-6)
    assert rows["0"].mse_after < rows["0"].mse_before
    assert math.isinf(rows["2"].sse_before)
    w = model[2].weight.detach()
    assert torch.equal(model[2].global_amax, w.abs().amax())
    assert torch.equal(model[2].block_amax.reshape(-1), nvfp4_scale_sweep(w, model[2].global_amax))
    assert torch.equal(
        model[0].block_amax.reshape(-1), nvfp4_scale_sweep(model[0].weight.detach(), model[0].global_amax)
    )


def test_bad_arguments():
    model = prepared()
    with pytest.raises(ValueError, match="backend must be one of"):
        recalibrate(model, backend="cuda")
    with pytest.raises(ValueError, match="method must be one of"):
        recalibrate(model, method="greedy")
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('raise', 'skip'\), got 'warn'"):
        recalibrate(model, on_nonfinite="warn")  # dropped: "skip" warns
    with pytest.raises(ValueError, match="holds no NVFP4Linear layers"):
        recalibrate(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        recalibrate({"w": torch.zeros(16)})


def test_dtensor_weight_is_gathered_for_the_sweep():
    # FSDP2 holds weights as DTensor shards while the scale buffers stay whole: the sweep must see
    # the full weight. A one-process gloo group is enough to build a DTensor on the CPU.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model, reference = prepared(seed=2), prepared(seed=2)
    drift(model)
    drift(reference)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        model[2].weight = nn.Parameter(distribute_tensor(model[2].weight.detach(), mesh, [Shard(0)]))
        report = recalibrate(model)
    finally:
        dist.destroy_process_group()
    recalibrate(reference)
    assert report.n_skipped == 0
    for name, t in reference.state_dict().items():
        if "amax" in name:
            assert torch.equal(model.state_dict()[name], t), name


def test_layer_owners_are_greedy_by_size_and_deterministic():
    # 30 -> rank 0; 20 -> rank 1; 10 -> rank 1 (load 20 < 30); 5: tie at 30, the lower rank wins
    assert layer_owners([10, 30, 20, 5], 2) == [1, 0, 1, 0]
    assert layer_owners([10, 30, 20, 5], 3) == [2, 0, 1, 2]
    assert layer_owners([7, 7, 7], 1) == [0, 0, 0] and layer_owners([], 4) == []


def test_recalibrate_distributed_without_a_process_group_is_recalibrate():
    model, reference = prepared(seed=4), prepared(seed=4)
    drift(model)
    drift(reference)
    report = recalibrate_distributed(model)
    ref_report = recalibrate(reference)
    assert [(r.name, r.sse_after, r.changed_fraction) for r in report.layers] == [
        (r.name, r.sse_after, r.changed_fraction) for r in ref_report.layers
    ]
    for name, t in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_cuda_non_finite_weights_on_the_fused_path(policy):
    # On a GPU the finiteness flags come back by an async copy (recalibration._layers.HostCopy),
    # read after the sweeps are queued: the same outcome as test_non_finite_weights.
    model = prepared()
    drift(model)
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            m.fake_quant_backend = "triton"  # the fused path
    gpu = model.cuda()
    before = {k: v.clone() for k, v in gpu.state_dict().items() if "amax" in k}
    if policy == "raise":
        with pytest.raises(ValueError, match="non-finite .* in layer '2'; no scale was changed"):
            recalibrate(gpu, backend="triton", on_nonfinite=policy)
        for k, v in gpu.state_dict().items():
            if "amax" in k:
                assert torch.equal(v, before[k]), k
        return
    with pytest.warns(UserWarning, match=r"skipped 1 layer\(s\) with non-finite weights.*\['2'\]"):
        report = recalibrate(gpu, backend="triton", on_nonfinite=policy)
    assert report.execution == "fused" and report.n_skipped == 1
    assert torch.equal(gpu[2].block_amax, before["2.block_amax"])
    for i in (0, 3):  # the finite layers were recalibrated: new global amax = max |w|, new scales
        assert not torch.equal(gpu[i].block_amax, before[f"{i}.block_amax"]), i
        assert torch.equal(gpu[i].global_amax, gpu[i].weight.detach().abs().amax().float()), i


def test_interleaved_clock_gives_each_task_its_streams_interval():
    # Round robin over k streams: task i is the (i // k)-th interval of stream i % k, and the
    # intervals are read in task order (each as its task ends, not one stream's all at once).
    reads = []

    class Fixed:
        def __init__(self, name, values):
            self.name, self.values = name, values

        def intervals(self):
            for i, v in enumerate(self.values):
                reads.append((self.name, i))
                yield v

    clock = _execute._Interleaved([Fixed("a", [1.0, 3.0, 5.0]), Fixed("b", [2.0, 4.0])], 5)
    assert clock.seconds() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert reads == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert _execute._Interleaved([Fixed("c", [7.0, 8.0])], 2).seconds() == [7.0, 8.0]
    assert _execute._sweep_streams(torch.device("cpu")) == [None]


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_cuda_fused_path_over_streams_equals_one_stream(monkeypatch, streams):
    # The fused path spreads the sweeps over SWEEP_STREAMS streams: the same scales and report
    # values as on one stream, every task timed, and the caller's stream (here not the default
    # one) current again afterwards. The caller's last write to the weights is held back on the
    # GPU (a sleep queued before it): the side streams must wait for it, or the scales would be
    # those of the old weights.
    def run(n):
        monkeypatch.setattr(_execute, "SWEEP_STREAMS", n)
        monkeypatch.setattr(_execute, "STATS_CHUNK", 2)  # several stats launches
        torch.manual_seed(0)
        dims = [64, 48, 32, 32, 16, 16, 128, 64]
        model = nn.Sequential(*(nn.Linear(i, o) for i, o in itertools.pairwise(dims))).cuda()
        model[1].to(torch.bfloat16)  # two dtypes: chunks per dtype, reordered stats
        quantize_model(model, init_calibration="max")
        for m in model:
            m.fake_quant_backend = "triton"
        user = torch.cuda.Stream()
        user.wait_stream(torch.cuda.current_stream())  # the model's set-up first
        with torch.cuda.stream(user):
            torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the write below
            with torch.no_grad():
                for m in model:
                    m.weight.mul_(1.5)
            report = recalibrate(model, backend="triton")
            assert torch.cuda.current_stream() == user
            out = [(m.global_amax.clone(), m.block_amax.clone()) for m in model]
        torch.cuda.synchronize()
        assert report.execution == "fused"
        assert all(r.seconds > 0 for r in report.layers)
        rows = [(r.sse_before, r.sse_after, r.changed_fraction, r.global_amax_after) for r in report.layers]
        return out, rows, model

    one, rows_one, _ = run(1)
    many, rows_many, model = run(streams)
    assert rows_many == rows_one
    for (g1, b1), (g2, b2), m in zip(one, many, model, strict=True):
        assert torch.equal(g1, g2) and torch.equal(b1, b2)
        assert torch.equal(g2, m.weight.detach().abs().amax().float())
        assert torch.equal(b2, nvfp4_scale_sweep(m.weight.detach(), g2).reshape(b2.shape))


@pytest.mark.gpu
def test_cuda_fused_sweep_restores_the_stream_when_a_launch_raises(monkeypatch):
    # A launch that fails halfway (a compile error, an interrupt): the caller's stream is current
    # again and has joined the side streams' queued work before the error reaches the caller.
    from nvfp4_qat.kernels import sweep as kernel_sweep

    monkeypatch.setattr(_execute, "SWEEP_STREAMS", 2)
    model = prepared().cuda()
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            m.fake_quant_backend = "triton"
    real, calls = kernel_sweep.launch_sweep, []

    def failing(*args, **kwargs):
        calls.append(torch.cuda.current_stream())
        if len(calls) == 3:
            raise RuntimeError("launch failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_sweep, "launch_sweep", failing)
    caller, device = torch.cuda.current_stream(), torch.cuda.current_device()
    with pytest.raises(RuntimeError, match="launch failed"):
        recalibrate(model, backend="triton")
    assert torch.cuda.current_stream() == caller and torch.cuda.current_device() == device
    assert calls[0] == caller and calls[1] != caller  # round robin: the second task on a side stream


def test_parametrized_weight_is_recalibrated_from_the_weight_forward_uses():
    # torch.nn.utils.parametrize moves the weight out of the module's parameter dict: the fast
    # accessor (NVFP4Linear.quant_tensors) then falls back to attribute access, which computes it.
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(64, 32)))
    layer = model[0]
    original = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", Double())
    w, b, g = layer.quant_tensors()
    assert torch.equal(w, 2 * original) and b is layer.block_amax and g is layer.global_amax
    report = recalibrate(model)
    assert not report.layers[0].skipped
    assert layer.global_amax.item() == (2 * original).abs().max().item()  # doubling is exact
    assert torch.equal(layer.block_amax.view(-1), nvfp4_scale_sweep(2 * original, layer.global_amax))
