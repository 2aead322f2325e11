"""NVFP4Linear and the straight-through estimators: forward contract, gradients, buffers, meta."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvfp4_qat import NVFP4Linear, QATConfig, fake_quantize_nvfp4, nvfp4_scale_sweep
from nvfp4_qat.format import block_codes, global_scale
from nvfp4_qat.modules import (
    NVFP4ActivationSTE,
    NVFP4WeightClippedSTE,
    NVFP4WeightSTE,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def make_linear(in_f=64, out_f=24, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def block_max(w: torch.Tensor) -> torch.Tensor:
    return w.float().abs().reshape(w.shape[0], -1, 16).amax(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_equals_fake_quant_then_linear(dtype, bias):
    layer = NVFP4Linear.from_linear(make_linear(bias=bias, dtype=dtype))
    x = torch.randn(3, 5, 64).to(dtype)
    expected = F.linear(x, fake_quantize_nvfp4(layer.weight, layer.block_amax, layer.global_amax), layer.bias)
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(
        layer.fake_quantized_weight(), fake_quantize_nvfp4(layer.weight, layer.block_amax, layer.global_amax)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_from_linear_reuses_parameters_and_keeps_dtype(dtype):
    linear = make_linear(dtype=dtype)
    w, b, ptr = linear.weight, linear.bias, linear.weight.data_ptr()
    layer = NVFP4Linear.from_linear(linear, QATConfig(init_calibration="max"))
    assert isinstance(layer, nn.Linear)
    assert layer.weight is w and layer.bias is b and layer.weight.data_ptr() == ptr
    assert layer.weight.dtype == dtype
    assert layer.block_amax.dtype == layer.global_amax.dtype == layer.input_amax.dtype == torch.float32
    assert layer.block_amax.shape == (24, 4) and layer.global_amax.shape == ()
    assert set(layer.state_dict()) == {"weight", "bias", "block_amax", "global_amax", "input_amax"}


def test_init_calibration_max_and_mse():
    linear = make_linear()
    w = linear.weight.detach().clone()
    by_max = NVFP4Linear.from_linear(linear, QATConfig(init_calibration="max"))
    assert torch.equal(by_max.global_amax, w.abs().amax())
    assert torch.equal(by_max.block_amax, block_max(w))
    by_mse = NVFP4Linear.from_linear(make_linear(), QATConfig(init_calibration="mse"))
    assert torch.equal(by_mse.global_amax, w.abs().amax())
    assert torch.equal(by_mse.block_amax.reshape(-1), nvfp4_scale_sweep(w, w.abs().amax()))
    assert not torch.equal(by_mse.block_amax, by_max.block_amax)  # the sweep moved some scales


def test_from_linear_on_meta_then_materialise():
    with torch.device("meta"):
        linear = nn.Linear(32, 16)
    layer = NVFP4Linear.from_linear(linear)
    assert layer.weight is linear.weight
    assert all(t.device.type == "meta" for t in (layer.block_amax, layer.global_amax, layer.input_amax))
    layer.to_empty(device="cpu")
    assert layer.block_amax.dtype == torch.float32 and layer.block_amax.device.type == "cpu"
    with torch.no_grad():
        layer.weight.copy_(make_linear(32, 16).weight)
    layer.init_scales()  # what recalibrate() does after materialisation
    ref = NVFP4Linear.from_linear(make_linear(32, 16))
    assert torch.equal(layer.block_amax, ref.block_amax) and torch.equal(layer.global_amax, ref.global_amax)


def test_to_linear_bakes_in_the_fake_quantized_weight():
    layer = NVFP4Linear.from_linear(make_linear(dtype=torch.bfloat16))
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    assert torch.equal(plain.weight, layer.fake_quantized_weight())
    assert plain.weight.dtype == torch.bfloat16 and plain.bias is layer.bias
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(plain(x), layer(x))


def test_scale_buffers_stay_fp32_under_dtype_casts():
    layer = NVFP4Linear.from_linear(make_linear())
    block = layer.block_amax.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        cast(layer)
        assert layer.block_amax.dtype == torch.float32 and torch.equal(layer.block_amax, block)
        assert layer.global_amax.dtype == torch.float32
    assert layer.weight.dtype == torch.float64
    layer.to("meta")
    assert layer.block_amax.device.type == "meta" and layer.block_amax.dtype == torch.float32


def test_weight_ste_gradient_passes_unchanged():
    w = torch.randn(8, 32, requires_grad=True)
    block, g = block_max(w.detach()), w.detach().abs().amax()
    grad_out = torch.randn(8, 32)
    NVFP4WeightSTE.apply(w, block, g).backward(grad_out)
    assert torch.equal(w.grad, grad_out)


def test_clipped_ste_gradient_follows_the_rule():
    torch.manual_seed(1)
    w = torch.randn(8, 64, requires_grad=True)
    g = w.detach().abs().amax()
    # Stale scales at 60% of each block's max: the largest elements of every block saturate.
    block = block_max(w.detach()) * 0.6
    block[0, 0] = 0.0  # a zero scale: every non-zero element of that block is clipped
    grad_out = torch.randn(8, 64)
    NVFP4WeightClippedSTE.apply(w, block, g).backward(grad_out)
    s2 = global_scale(g)
    scale = (block_codes(block, s2) * s2).repeat_interleave(16, dim=1)  # (8, 64)
    inside = w.detach().abs() <= 6 * scale
    assert 0 < int((~inside).sum()) < w.numel() // 2
    assert not inside[0, :16].any()
    assert torch.equal(w.grad, torch.where(inside, grad_out, torch.zeros_like(grad_out)))


@pytest.mark.parametrize("gradient", ["ste", "clipped_ste"])
def test_layer_gradients_through_linear(gradient):
    layer = NVFP4Linear.from_linear(make_linear(), QATConfig(gradient=gradient))
    x = torch.randn(6, 64, requires_grad=True)
    grad_out = torch.randn(6, 24)
    layer(x).backward(grad_out)
    wq = layer.fake_quantized_weight().detach().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, wq, layer.bias.detach()).backward(grad_out)
    if gradient == "ste":
        assert torch.equal(layer.weight.grad, wq.grad)
    else:  # MSE-swept scales may clip a block's largest elements: their gradient is zeroed
        s2 = global_scale(layer.global_amax)
        scale = (block_codes(layer.block_amax, s2) * s2).repeat_interleave(16, dim=1)
        inside = layer.weight.detach().abs() <= 6 * scale
        assert torch.equal(layer.weight.grad, torch.where(inside, wq.grad, torch.zeros_like(wq.grad)))
    assert torch.equal(x.grad, x2.grad)
    assert layer.block_amax.grad is None and not layer.block_amax.requires_grad


def test_activation_fake_quant_training_and_eval():
    layer = NVFP4Linear.from_linear(make_linear(), QATConfig(quantize_activations=True))
    assert float(layer.input_amax) == 0.0
    x1 = torch.randn(5, 64) * 3
    x2 = torch.randn(5, 64)
    layer.train()
    for x in (x1, x2):
        out = layer(x)
    running = x1.abs().amax()
    assert torch.equal(layer.input_amax, running)  # running max, x2 is smaller
    xq = fake_quantize_nvfp4(x2, x2.abs().reshape(-1, 16).amax(-1), running)
    assert torch.equal(out, F.linear(xq, layer.fake_quantized_weight(), layer.bias))
    layer.eval()
    x3 = torch.randn(5, 64) * 10  # beyond the calibrated amax: used as is, not updated
    out = layer(x3)
    assert torch.equal(layer.input_amax, running)
    xq = fake_quantize_nvfp4(x3, x3.abs().reshape(-1, 16).amax(-1), running)
    assert torch.equal(out, F.linear(xq, layer.fake_quantized_weight(), layer.bias))


def test_activation_uncalibrated_eval_uses_current_max_and_ste():
    layer = NVFP4Linear.from_linear(make_linear(), QATConfig(quantize_activations=True)).eval()
    x = torch.randn(2, 3, 64, requires_grad=True)
    out = layer(x)
    xd = x.detach()
    xq = fake_quantize_nvfp4(xd, xd.abs().reshape(2, 3, 4, 16).amax(-1), xd.abs().amax())
    assert torch.equal(out, F.linear(xq, layer.fake_quantized_weight(), layer.bias))
    assert float(layer.input_amax) == 0.0
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ layer.fake_quantized_weight().detach())


def test_activation_ste_passes_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    grad_out = torch.randn(4, 32)
    NVFP4ActivationSTE.apply(x, x.detach().abs().reshape(-1, 16).amax(-1), x.detach().abs().amax()).backward(
        grad_out
    )
    assert torch.equal(x.grad, grad_out)


def test_state_dict_round_trip_bit_identical():
    layer = NVFP4Linear.from_linear(make_linear(seed=3), QATConfig(quantize_activations=True))
    layer(torch.randn(4, 64))  # sets input_amax
    fresh = NVFP4Linear.from_linear(make_linear(seed=4), QATConfig(quantize_activations=True))
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(7, 64)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="in_features must be divisible by block_size=16"):
        NVFP4Linear(40, 8)
    with pytest.raises(TypeError, match="config must be a QATConfig"):
        NVFP4Linear(32, 8, config={"gradient": "ste"})
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        NVFP4Linear.from_linear(nn.Conv1d(16, 16, 1))
    layer = NVFP4Linear(32, 8)
    with pytest.raises(ValueError, match="fake_quant_backend must be one of .* got 'cuda'"):
        layer.fake_quant_backend = "cuda"  # refused where it is set, not at the next forward
    with pytest.raises(ValueError, match="'torch' is now called 'reference'"):
        QATConfig(fake_quant_backend="torch")
    assert layer.fake_quant_backend == "auto" and layer.config.fake_quant_backend == "auto"
    with pytest.raises(ValueError, match="mode must be one of"):
        layer.init_scales("min")
    bad = make_linear()
    with torch.no_grad():
        bad.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        NVFP4Linear.from_linear(bad, QATConfig(init_calibration="mse"))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = NVFP4Linear(32, 8)
    layer.fake_quant_backend = "triton"
    with pytest.raises(ValueError, match="fake_quant_backend='triton' needs a CUDA tensor"):
        layer(torch.randn(2, 32))


def test_compile_traces_the_layer_on_cpu():
    # aot_eager: dynamo + autograd tracing of the STE, no C++ toolchain needed.
    layer = NVFP4Linear.from_linear(make_linear(), QATConfig(gradient="clipped_ste"))
    x = torch.randn(4, 64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, layer(x))
    out.sum().backward()
    assert layer.weight.grad is not None
