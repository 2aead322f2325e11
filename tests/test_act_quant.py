"""The W4A4 input path (kernels.act_quant) equals the PyTorch reference bit for bit.

Reference: ``format.fake_quantize_unchecked(x, x.abs().reshape(-1, 16).amax(-1).float(), g)`` and
``x.abs().amax().float()``. CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET`` set
per test, as in test_fake_quant_triton.py); ``-m gpu`` repeats the parity on CUDA at larger sizes.
"""

import pytest
import torch
import torch.nn.functional as F

from nvfp4_qat import NVFP4Linear, QATConfig
from nvfp4_qat.format import block_code_bytes, fake_quantize_unchecked, global_scale
from nvfp4_qat.kernels import act_quant as aq
from nvfp4_qat.kernels.fake_quant import CONFIGS
from nvfp4_qat.modules import NVFP4ActivationSTE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# Odd shapes: one block, a partial last tile, several programs of the max pass (512 blocks each).
SHAPES = [(1, 16), (3, 48), (2, 5, 64), (37, 272)]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_bits_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bitwise equality (-0.0 != +0.0), any NaN equal to any NaN (NaN payloads are not the format's)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    a, b = out.contiguous().view(INT_VIEW[out.dtype]), ref.contiguous().view(INT_VIEW[ref.dtype])
    diff = (a != b) & ~(out.isnan() & ref.isnan())
    assert int(diff.sum()) == 0, f"{int(diff.sum())} of {diff.numel()} elements differ"
    assert torch.equal(out.isnan(), ref.isnan())


def reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return fake_quantize_unchecked(x, x.abs().reshape(-1, 16).amax(-1).float(), g, 16)


def random_x(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 0.02
    x.view(-1)[:: max(1, x.numel() // 7)] *= 40  # heavy tails: blocks far above the rest
    x.view(-1)[1::5] = 0.0  # all-zero stretches and exact zeros
    return x.to(dtype)


def s2_values() -> list[float]:
    """s2 across the whole positive fp32 range: subnormals, every third binade, the largest."""
    gen = torch.Generator().manual_seed(5)
    out = [2.0**-149, 2.0**-148 * 3, 2.0**-126, float(torch.finfo(torch.float32).max) / 2688]
    for exp in range(-149, 128, 3):
        out += [float(torch.tensor(2.0**exp) * m) for m in 1 + torch.rand(3, generator=gen)]
    return [v for v in out if 0 < v < float("inf")]


def test_code_thresholds_are_the_exact_boundaries():
    """For every s2 and FP8 byte c, T[c] reaches byte c and the float below does not, and the search
    window's ends fail and pass (the window brackets the boundary, so the first passing float is it)."""
    c = torch.arange(1, 127, dtype=torch.uint8)
    for s2v in s2_values():
        s2 = torch.tensor(s2v, dtype=torch.float32)
        t = aq.code_thresholds(s2)
        assert t.shape == (128,) and t.dtype == torch.float32 and t[0] == 0 and t[127].isnan()
        thr = t[1:127]
        assert not thr.isnan().any() and (thr[1:] >= thr[:-1]).all(), s2v
        assert (block_code_bytes(thr, s2) >= c).all(), s2v
        below = (thr.view(torch.int32) - 1).clamp(min=0).view(torch.float32)
        assert not ((block_code_bytes(below, s2) >= c) & (thr > 0)).any(), s2v
        six_mid, _ = aq._code_constants(s2.device)
        guess = (six_mid * s2).view(torch.int32)
        lo = (guess - aq._CODE_WINDOW).clamp(min=0).view(torch.float32)
        hi = (guess + aq._CODE_WINDOW).clamp(max=aq._INF_BITS).view(torch.float32)
        assert not (block_code_bytes(lo, s2) >= c).any(), s2v
        assert (block_code_bytes(hi, s2) >= c).all(), s2v


@pytest.mark.parametrize("s2v", [0.0, float("inf"), float("nan")])
def test_code_thresholds_degenerate_scale_reach_nothing(s2v):
    t = aq.code_thresholds(torch.tensor(s2v))
    assert t[1:].isnan().all()  # every byte 0, as format.block_codes gives
    b = torch.tensor([0.0, 1.0, float("inf"), float("nan")])
    assert (block_code_bytes(b, torch.tensor(s2v)) == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interpreter_matches_reference(interpret, dtype, shape):
    x = random_x(shape, dtype, seed=sum(shape))
    cur = aq.act_amax_triton(x)
    assert cur.shape == () and cur.dtype == torch.float32
    assert torch.equal(cur, x.abs().amax().float())
    # the tensor's own max, a stale smaller one (saturating blocks) and a larger one
    for g in (cur, cur * 0.7, cur * 3):
        assert_bits_equal(aq.act_fake_quant_triton(x, g), reference(x, g))


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"rows{c['ROWS']}w{c['num_warps']}t{c.get('TILES', 1)}"
)
def test_interpreter_each_config_with_partial_last_tile(interpret, config):
    span = config["ROWS"] * config.get("TILES", 1)
    x = random_x((span + span // 2 + 1, 16), torch.bfloat16, seed=3)  # a whole and a partial program
    g = x.abs().amax().float()
    assert_bits_equal(aq.act_fake_quant_triton(x, g, config=config), reference(x, g))
    assert_bits_equal(aq.act_fake_quant_triton(x[:span], g, config=config), reference(x[:span], g))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interpreter_block_amax_at_every_byte_boundary(interpret, dtype):
    """Blocks whose amax is exactly each threshold T[c], and the float below it, for a few s2: the
    in-kernel binary search must pick the byte that format.block_code_bytes picks."""
    for g in (torch.tensor(1.0), torch.tensor(3e-3), torch.tensor(2.0**-120)):
        t = aq.code_thresholds(global_scale(g))[1:127]
        below = (t.view(torch.int32) - 1).view(torch.float32)
        amax = torch.cat([t, below]).to(dtype).float()  # representable in x's dtype (or its rounding)
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(amax.numel(), 16, generator=gen) * 2 - 1) * amax[:, None]
        x[:, 3] = -amax  # the block's max, negative on purpose
        x = x.to(dtype)
        assert_bits_equal(aq.act_fake_quant_triton(x, g), reference(x, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
def test_interpreter_non_finite_input(interpret, dtype):
    x = random_x((40, 32), dtype, seed=7)
    x[1, 2], x[5, 20], x[9, 0], x[9, 1] = float("nan"), float("inf"), float("-inf"), float("nan")
    x[30, 17] = float("-inf")
    cur = aq.act_amax_triton(x)
    assert cur.isnan()  # NaN wins over Inf: the layer must see the batch as non-finite
    assert torch.equal(
        aq.act_amax_triton(x.nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))),
        torch.tensor(float("inf")),
    )
    for g in (torch.tensor(0.0), x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().amax().float()):
        out = aq.act_fake_quant_triton(x, g)
        assert_bits_equal(out, reference(x, g))
        assert torch.equal(out.isnan(), ~x.isfinite())
    # eval fallback of an uncalibrated layer on such a batch: g = cur = NaN gives NaN everywhere
    assert_bits_equal(aq.act_quant_prepared(x, *aq.prepare_dynamic(cur)), reference(x, cur))


def test_interpreter_amax_of_empty_and_zero_input(interpret):
    # empty input (a layer may see a batch of 0 tokens): the unchecked hot path gives max 0, no output
    assert torch.equal(aq.input_amax(torch.zeros(0, 32)), torch.tensor(0.0))
    empty = aq.act_quant_prepared(torch.zeros(0, 32), *aq.prepare_dynamic(torch.tensor(1.0)))
    assert empty.shape == (0, 32)
    z = torch.zeros(4, 32, dtype=torch.bfloat16)
    z[1] = -0.0
    assert aq.act_amax_triton(z).view(torch.int32) == 0  # +0, never -0
    assert_bits_equal(aq.act_fake_quant_triton(z, 0.0), reference(z, torch.tensor(0.0)))


def test_interpreter_custom_ops_and_non_contiguous_input(interpret):
    x = random_x((9, 48), torch.bfloat16, seed=2)
    g = x.abs().amax().float()
    torch.library.opcheck(torch.ops.nvfp4_qat.act_amax, (x,))
    torch.library.opcheck(torch.ops.nvfp4_qat.act_fake_quant, (x, g))
    xt = random_x((48, 32), torch.float32, seed=4).t()  # (32, 48), not contiguous
    out = aq.act_fake_quant_triton(xt, 0.5)
    assert out.is_contiguous()
    assert_bits_equal(out, reference(xt.contiguous(), torch.tensor(0.5)))


def test_launcher_validation(interpret, monkeypatch):
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        aq.act_fake_quant_triton(x.numpy(), 1.0)
    with pytest.raises(TypeError, match="floating dtype"):
        aq.act_amax_triton(x.to(torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        aq.act_amax_triton(torch.randn(2, 24))
    with pytest.raises(ValueError, match="global_amax"):
        aq.act_fake_quant_triton(x, float("nan"))
    with pytest.raises(ValueError, match="config"):
        aq.act_fake_quant_triton(x, 1.0, config={"ROWS": 48, "num_warps": 4})
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA tensor"):
        aq.act_amax_triton(x)


def w4a4_pair(seed=0):
    """Two identical W4A4 layers: the Triton path (interpreted) and the PyTorch path."""
    torch.manual_seed(seed)
    cfg = QATConfig(quantize_activations=True, backend="reference")  # the sweep kernel is not under test
    a, b = NVFP4Linear(48, 16, config=cfg), NVFP4Linear(48, 16, config=cfg)
    b.load_state_dict(a.state_dict())
    a.fake_quant_backend, b.fake_quant_backend = "triton", "reference"
    return a, b


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
def test_interpreter_layer_training_nan_batch_and_gradients(interpret):
    """Training through the kernel path: the same outputs, running max, skipped-batch count and
    gradients (the STE passes dL/dx unchanged) as the PyTorch path, NaN and Inf batches included."""
    layers = w4a4_pair()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, 48, generator=gen) * s for s in (2.0, 1.0, 4.0, 0.5)]
    xs[1][0, 2, 7] = float("nan")
    xs[2][2, 1, 40] = float("inf")  # non-finite: skipped, though larger than every other batch
    for x in xs:
        grads = []
        for layer in layers:
            xi = x.clone().requires_grad_()
            out = layer(xi)
            grad_out = torch.ones_like(out)
            out.backward(grad_out)
            grads.append((out, xi.grad, layer.weight.grad))
            assert torch.equal(xi.grad, grad_out @ layer.fake_quantized_weight().detach())
            layer.weight.grad = None
        for u, v in zip(*grads, strict=True):
            assert_bits_equal(u, v)
    a, b = layers
    assert torch.equal(a.input_amax, b.input_amax)
    assert torch.equal(a.input_amax, torch.maximum(xs[0].abs().amax(), xs[3].abs().amax()))
    assert int(a.nonfinite_input_batches) == int(b.nonfinite_input_batches) == 2


def test_interpreter_layer_eval_fallback_and_calibrated(interpret):
    a, b = (layer.eval() for layer in w4a4_pair(seed=2))
    x = torch.randn(7, 48) * 3
    for _ in range(2):  # uncalibrated (input_amax == 0: each input's own max), then calibrated
        out_a, out_b = a(x), b(x)
        assert_bits_equal(out_a, out_b)
        xq = reference(x, x.abs().amax() if float(a.input_amax) == 0 else a.input_amax)
        assert_bits_equal(out_a, F.linear(xq, a.fake_quantized_weight(), a.bias))
        with torch.no_grad():
            a.input_amax.fill_(1.5)
            b.input_amax.fill_(1.5)


def test_activation_ste_with_own_block_amax():
    """``NVFP4ActivationSTE`` with ``block_amax=None`` equals the explicit form; gradient unchanged."""
    x = (torch.randn(4, 32) * 2).requires_grad_()
    g = torch.tensor(3.0)
    out = NVFP4ActivationSTE.apply(x, None, g, "reference")
    assert_bits_equal(
        out, NVFP4ActivationSTE.apply(x, x.detach().abs().reshape(-1, 16).amax(-1), g, "reference")
    )
    grad_out = torch.randn(4, 32)
    out.backward(grad_out)
    assert torch.equal(x.grad, grad_out)


def test_compile_traces_the_w4a4_layer_on_cpu():
    # aot_eager: dynamo + autograd tracing of the STE and the in-place running max, no C++ toolchain.
    torch.manual_seed(0)
    layer = NVFP4Linear(48, 16, config=QATConfig(quantize_activations=True, backend="reference"))
    ref = NVFP4Linear(48, 16, config=layer.config)
    ref.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for x in (torch.randn(4, 48) * 2, torch.randn(4, 48)):
        assert torch.equal(compiled(x), ref(x))
    assert torch.equal(layer.input_amax, ref.input_amax)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 16), (999, 48), (4096, 4096), (3, 2048, 112)], ids=str)
def test_cuda_matches_reference(dtype, shape):
    x = random_x(shape, dtype, seed=0).cuda()
    x.view(-1)[12345 % x.numel()] = float("inf")
    cur = aq.act_amax_triton(x)
    assert torch.equal(cur.cpu(), x.cpu().abs().amax().float())
    g = x.nan_to_num(posinf=0.0).abs().amax().float()
    assert_bits_equal(aq.act_fake_quant_triton(x, g).cpu(), reference(x.cpu(), g.cpu()))


@pytest.mark.gpu
def test_cuda_w4a4_layer_and_compile_match_torch_path():
    torch.manual_seed(0)
    cfg = QATConfig(quantize_activations=True)
    a = NVFP4Linear(256, 512, config=cfg).cuda().to(torch.bfloat16)
    b = NVFP4Linear(256, 512, config=cfg).cuda().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    b.fake_quant_backend = "reference"
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(a.fake_quantized_input(x), b.fake_quantized_input(x))
    assert torch.equal(a.input_amax, b.input_amax)
    xq = torch.compile(a.fake_quantized_input)(x * 0.5)
    assert torch.equal(xq, b.fake_quantized_input(x * 0.5))


def test_interpreter_layer_empty_batch(interpret):
    for layer in w4a4_pair(seed=3):
        assert layer(torch.zeros(0, 48)).shape == (0, 16)
        assert float(layer.input_amax) == 0.0 and int(layer.nonfinite_input_batches) == 0
