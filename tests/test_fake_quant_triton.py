"""The fused Triton fake-quant equals format.fake_quantize_nvfp4 bit for bit.

CPU tests run the kernel in Triton's interpreter (the launcher builds the interpreted kernel itself,
so only the ``TRITON_INTERPRET`` check needs the variable; it is set per test, never leaked).
GPU tests (``-m gpu``) repeat the parity at larger sizes on CUDA and cover the module paths.
"""

import importlib
import itertools
import math

import pytest
import torch
from torch import nn

from nvfp4_qat import NVFP4Linear, QATConfig, fake_quantize_nvfp4, quantize_model, recalibrate
from nvfp4_qat.format import E2M1_MIDPOINTS, E2M1_VALUES, fp8_code_values
from nvfp4_qat.kernels import fake_quant as fq
from nvfp4_qat.kernels.fake_quant import CONFIGS, STATS_CONFIG, fake_quant_stats_triton, fake_quant_triton
from nvfp4_qat.modules import quant_error_stats

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_bits_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bitwise equality (so -0.0 != +0.0) except that any NaN equals any NaN (the sign and payload of
    a NaN are not part of the format: PyTorch's own bf16 cast makes every NaN 0xFFFF on the CPU);
    the message counts differing elements and blocks."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    a, b = out.contiguous().view(INT_VIEW[out.dtype]), ref.contiguous().view(INT_VIEW[ref.dtype])
    both_nan = out.isnan() & ref.isnan()
    diff = ((a != b) & ~both_nan).reshape(-1, 16 if a.numel() % 16 == 0 else 1)  # blocks of the last dim
    n_el, n_bl = int(diff.sum()), int(diff.any(dim=1).sum())
    assert n_el == 0, f"{n_el} elements in {n_bl} of {diff.shape[0]} blocks differ"
    nan = out.isnan()  # torch.equal with equal_nan: the same NaNs, and the rest equal
    assert torch.equal(nan, ref.isnan()) and torch.equal(out[~nan], ref[~nan])


def max_amax(x: torch.Tensor):
    xf = x.float().abs()
    return xf.reshape(*x.shape[:-1], -1, 16).amax(-1), xf.amax()


def span(config: dict) -> int:
    """Blocks one program of ``config`` covers."""
    return config["ROWS"] * config.get("TILES", 1)


def config_id(config: dict) -> str:
    return f"rows{config['ROWS']}w{config['num_warps']}t{config.get('TILES', 1)}"


def random_case(shape, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 0.02
    x.view(-1)[:: max(1, x.numel() // 7)] *= 40  # heavy tails: some blocks far above the rest
    x = x.to(device=device, dtype=dtype)
    block, g = max_amax(x)
    # Stale scales for every third block (70% of the max): the largest elements saturate.
    block.view(-1)[::3] *= 0.7
    return x, block, g


def midpoint_walk(dtype, device="cpu"):
    """Blocks whose ``u = |x| / s2`` hits every E2M1 value and midpoint times ``e`` exactly, and the
    fp32 neighbours of each midpoint, for normal and FP8-subnormal codes; s2 = 2**-10 exactly."""
    s2 = 2.0**-10
    codes = fp8_code_values()
    picks = [codes[0], codes[5], codes[7], codes[50], codes[63], codes[90], codes[-1]]  # 2^-9 .. 448
    rows, amax = [], []
    for e in (float(c) for c in picks):
        us = [v * e for v in E2M1_VALUES] + [7.0 * e]
        for mid, _ in E2M1_MIDPOINTS:
            t = torch.tensor(mid * e, dtype=torch.float32)
            us += [float(t), float(torch.nextafter(t, t + 1)), float(torch.nextafter(t, t - 1))]
        vals = torch.tensor(us, dtype=torch.float32) * s2
        vals = torch.cat([vals, -vals])
        vals = torch.nn.functional.pad(vals, (0, (-vals.numel()) % 16))
        rows.append(vals.reshape(-1, 16))
        amax += [6.0 * e * s2] * rows[-1].shape[0]
    x = torch.cat(rows).to(device=device, dtype=dtype)
    block = torch.tensor(amax, dtype=torch.float32, device=device)
    return x, block, torch.tensor(2688.0 * s2, device=device)


def special_values_case(dtype, device="cpu"):
    """Zeros, -0.0, NaN, +-Inf, an all-zero block, a block 1e5 smaller than the tensor max."""
    x = torch.randn(6, 32) * 0.1
    x[0, :16] = 0.0
    x[0, 16:] = -0.0
    x[1, 3], x[1, 4], x[1, 5] = float("nan"), float("inf"), float("-inf")
    x[2, :16] *= 1e-5
    x[3, 16:] = 0.031  # all equal
    x[4, :] = 0.0
    x[4, 7] = -0.05  # single non-zero
    x = x.to(device=device, dtype=dtype)
    block, _ = max_amax(x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))
    return x, block, torch.tensor(0.5, device=device)


SHAPES = [(1, 16), (7, 16), (37, 48), (4, 3, 64), (64, 256)]


@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interpreter_matches_reference(interpret, dtype, shape, seed):
    x, block, g = random_case(shape, dtype, seed)
    assert_bits_equal(fake_quant_triton(x, block, g), fake_quantize_nvfp4(x, block, g))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: config_id(c))
def test_interpreter_each_config_with_partial_last_tile(interpret, config):
    n_blocks = 2 * span(config) + 3
    x, block, g = random_case((n_blocks, 16), torch.bfloat16, 5)
    assert_bits_equal(fake_quant_triton(x, block, g, config=config), fake_quantize_nvfp4(x, block, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_interpreter_midpoints_and_special_values(interpret, dtype):
    for x, block, g in (midpoint_walk(dtype), special_values_case(dtype)):
        assert_bits_equal(fake_quant_triton(x, block, g), fake_quantize_nvfp4(x, block, g))
    x, block, _ = special_values_case(dtype)
    zero = torch.tensor(0.0)  # s2 == 0: every finite input gives a signed zero, never NaN
    out = fake_quant_triton(x, block, zero)
    assert_bits_equal(out, fake_quantize_nvfp4(x, block, zero))
    assert torch.equal(out.isnan(), ~torch.isfinite(x)) and not out.isinf().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_input_gives_nan_in_every_implementation(interpret, dtype, value):
    # Issue 13: NaN came out as 0 and Inf as 6 * e * s2, so a NaN weight gave a finite loss.
    x, block, g = random_case((8, 64), dtype, 3)
    x[2, 17] = float(value)
    x[5] = float(value)  # a whole row: its blocks' scales stay finite (stale)
    ref = fake_quantize_nvfp4(x, block, g)
    assert torch.equal(ref.isnan(), ~torch.isfinite(x)), "reference: NaN exactly where x is not finite"
    assert_bits_equal(fake_quant_triton(x, block, g), ref)
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros_like(x))
    # Every finite element keeps its old bits.
    assert torch.equal(ref[finite], fake_quantize_nvfp4(clean, block, g)[finite])


def test_interpreter_non_contiguous_input(interpret):
    base = torch.randn(64, 48) * 0.02
    x = base.t()  # (48, 64), not contiguous
    block, g = max_amax(x)
    out = fake_quant_triton(x, block, g)
    assert out.is_contiguous()
    assert_bits_equal(out, fake_quantize_nvfp4(x, block, g))


def test_interpreter_custom_op_and_module_path(interpret):
    x, block, g = random_case((9, 32), torch.bfloat16, 2)
    torch.library.opcheck(torch.ops.nvfp4_qat.fake_quant_nvfp4, (x, block, g))
    assert_bits_equal(torch.ops.nvfp4_qat.fake_quant_nvfp4(x, block, g), fake_quantize_nvfp4(x, block, g))

    torch.manual_seed(0)
    cfg = QATConfig(quantize_activations=True, backend="reference")  # the sweep kernel is not under test
    layers = [NVFP4Linear(32, 8, config=cfg) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    layers[1].fake_quant_backend = "triton"
    x = torch.randn(5, 32)
    outs = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.square().sum().backward()
        outs.append((out, xi.grad, layer.weight.grad))
    for a, b in zip(*outs, strict=True):
        assert_bits_equal(a, b)


def torch_stats(x, block, g) -> list[float]:
    """(sum of squared fp32 NVFP4 error, max |x|, sum x^2) in float64."""
    xf = x.double()
    err = fake_quantize_nvfp4(x.float(), block, g).double() - xf
    return [float(err.square().sum()), float(xf.abs().max()), float(xf.square().sum())]


SSE_CASES = [(torch.bfloat16, c) for c in CONFIGS] + [
    (d, c) for d in (torch.float32, torch.float16) for c in (CONFIGS[0], STATS_CONFIG)
]


@pytest.mark.parametrize(
    ("dtype", "config"), SSE_CASES, ids=lambda v: config_id(v) if isinstance(v, dict) else str(v)[6:]
)
@pytest.mark.parametrize("tiles", [1.5, 2], ids=["partial-tile", "whole-tiles"])  # masked / unmasked
def test_interpreter_stats_mode(interpret, dtype, config, tiles):
    x, block, g = random_case((int(span(config) * tiles), 16), dtype, 4)
    assert_bits_equal(fake_quant_triton(x, block, g, config=config), fake_quantize_nvfp4(x, block, g))
    stats = fake_quant_stats_triton(x, block, g, config=config)
    assert stats.dtype == torch.float32 and stats.shape == (3,)
    want = torch_stats(x, block, g)
    for got, ref in zip(stats.tolist(), want, strict=True):
        assert math.isclose(got, ref, rel_tol=1e-6)
    assert stats[1] == x.float().abs().max()  # the max is exact
    torch_path = quant_error_stats(x, block, g, "reference")
    for got, ref in zip(torch_path.tolist(), want, strict=True):
        assert math.isclose(got, ref, rel_tol=1e-6)


def check_stats_partials(dtype, device, shapes):
    """One launch over tensors of different sizes (and one not 16-byte aligned, which is copied)
    gives each tensor's sums in its own columns, as the per-tensor PyTorch sums."""
    cases = [random_case(shape, dtype, seed, device) for seed, shape in enumerate(shapes)]
    base = random_case((41, 16), dtype, 9, device)[0].reshape(-1)
    odd = base[3 : 3 + 40 * 16].view(40, 16)  # a view 3 elements in: not aligned, so copied
    assert odd.data_ptr() % 16 != 0
    cases.append((odd, *max_amax(odd)))
    states = [fq.prepare(block, g) for _, block, g in cases]
    partials, programs = fq.stats_partials([x for x, _, _ in cases], states)
    assert partials.shape == (3, sum(programs))
    assert programs == [max(1, -(-x.numel() // 16 // span(STATS_CONFIG))) for x, _, _ in cases]
    start = 0
    for (x, block, g), n in zip(cases, programs, strict=True):
        part = partials[:, start : start + n]
        got = [float(part[0].sum()), float(part[1].max()), float(part[2].sum())]
        want = torch_stats(x.cpu(), block.cpu(), g.cpu())
        for a, b in zip(got, want, strict=True):
            assert math.isclose(a, b, rel_tol=1e-5)
        assert got[1] == want[1]  # the max is exact
        start += n


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interpreter_stats_partials_over_many_tensors(interpret, dtype):
    check_stats_partials(dtype, "cpu", [(7, 16), (130, 32), (1, 16), (600, 48)])


def test_interpreter_stats_partials_refuses_mixed_dtypes(interpret):
    cases = [random_case((4, 16), dtype, 0) for dtype in (torch.float32, torch.bfloat16)]
    states = [fq.prepare(block, g) for _, block, g in cases]
    with pytest.raises(ValueError, match="xs must be tensors of one dtype and device"):
        fq.stats_partials([x for x, _, _ in cases], states)
    with pytest.raises(ValueError, match="one \\(codes, table\\) state each"):
        fq.stats_partials([cases[0][0]], states)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_stats_partials_over_many_tensors(dtype):
    check_stats_partials(dtype, "cuda", [(7, 16), (1024, 4096), (1, 16), (4096, 1008), (333, 64)])


def test_interpreter_segment_totals(interpret):
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 2500, 7, 1024]  # one segment longer than the kernel's 1024-wide block
    partials = torch.rand(3, sum(lengths) + 5, generator=gen)  # trailing columns are not read
    partials[1, 1 + 1800] = float("nan")  # in the second segment's max row
    partials[0, 1 + 2500 + 3] = float("inf")  # in the third segment's first sum row
    out = fq.segment_totals(partials, lengths, max_row=1)
    assert out.shape == (4, 3) and out.dtype == torch.float32
    start = 0
    for i, n in enumerate(lengths):
        seg = partials[:, start : start + n].double()
        want = [seg[0].sum(), seg[1].max() if not seg[1].isnan().any() else float("nan"), seg[2].sum()]
        for got, ref in zip(out[i].tolist(), [float(w) for w in want], strict=True):
            assert (math.isnan(got) and math.isnan(ref)) or math.isclose(got, ref, rel_tol=1e-6)
        start += n
    assert math.isnan(out[1, 1]) and math.isinf(out[2, 0]) and out[0, 1] == partials[1, 0]
    summed = fq.segment_totals(partials[:2], lengths)  # no max row: both rows summed
    assert math.isclose(float(summed[3, 1]), float(partials[1, 2508:3532].double().sum()), rel_tol=1e-6)


@pytest.mark.parametrize("chunk", [32, 2, 1])
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-dtypes", "one-dtype"])
def test_interpreter_stale_stats_in_chunks_and_dtype_groups(interpret, monkeypatch, chunk, mixed):
    recal = importlib.import_module("nvfp4_qat.recalibration._execute")
    monkeypatch.setattr(recal, "STATS_CHUNK", chunk)
    torch.manual_seed(0)
    dims = [64, 48, 32, 32, 16, 16]
    model = nn.Sequential(*(nn.Linear(i, o) for i, o in itertools.pairwise(dims)))
    if mixed:
        model[1].to(torch.bfloat16)
        model[4].to(torch.bfloat16)
    quantize_model(model, QATConfig(init_calibration="max", backend="reference"))
    with torch.no_grad():
        model[1].weight[2, 3] = float("nan")
    for m in model:
        m.fake_quant_backend = "triton"
    launches, real = [], fq.stats_partials
    monkeypatch.setattr(fq, "stats_partials", lambda xs, *a: launches.append(len(xs)) or real(xs, *a))
    tasks = (recal.SweepTask(m, m.weight.detach()) for m in model)  # a generator, as recalibrate passes
    done, stats = recal.stale_stats(tasks, fused=True)
    assert [t.layer for t in done] == list(model)
    # A dtype's chunk goes out as soon as it is full, in the order the tasks come (fp32 layers 0, 2,
    # 3 and bf16 layers 1, 4 when mixed); what is left, at the end, in the order the dtypes came.
    want_launches = {(True, 32): [3, 2], (True, 2): [2, 2, 1], (True, 1): [1] * 5,
                     (False, 32): [5], (False, 2): [2, 2, 1], (False, 1): [1] * 5}  # fmt: skip
    assert launches == want_launches[mixed, chunk]
    for i, m in enumerate(model):
        want = quant_error_stats(m.weight.detach(), m.block_amax, m.global_amax, "reference")
        if i == 1:  # NaN weight: NaN error and NaN max (the finiteness flag), in its own row
            assert stats[i, :2].isnan().all()
            continue
        assert stats[i, 1] == want[1]
        assert math.isclose(float(stats[i, 0]), float(want[0]), rel_tol=1e-6)
        assert math.isclose(float(stats[i, 2]), float(want[2]), rel_tol=1e-6)


def test_interpreter_stats_of_non_finite_input(interpret):
    x, block, g = random_case((8, 32), torch.float32, 0)
    x[3, 3] = float("inf")
    assert math.isinf(float(fake_quant_stats_triton(x, block, g)[0]))
    x[5, 5] = float("nan")
    assert math.isnan(float(fake_quant_stats_triton(x, block, g)[0]))


def test_interpreter_module_caches_kernel_state(interpret, monkeypatch):
    """The FP8 bytes and decision table are prepared once per scale change, not once per forward."""
    calls = []
    prepare = fq.prepare
    monkeypatch.setattr(fq, "prepare", lambda *a: calls.append(1) or prepare(*a))
    torch.manual_seed(0)
    layer = NVFP4Linear(32, 8, config=QATConfig(backend="reference"))
    layer.fake_quant_backend = "triton"
    x = torch.randn(3, 32)
    first = layer(x)
    assert_bits_equal(layer(x), first)
    assert len(calls) == 1
    with torch.no_grad():
        layer.block_amax.mul_(0.5)  # in place: the version counter moves
    halved = layer(x)
    assert len(calls) == 2
    assert_bits_equal(
        halved,
        nn.functional.linear(
            x, fake_quantize_nvfp4(layer.weight, layer.block_amax, layer.global_amax), layer.bias
        ),
    )
    layer.load_state_dict({**layer.state_dict(), "global_amax": layer.global_amax * 2})
    layer(x)
    assert len(calls) == 3
    layer.global_amax = layer.global_amax.clone()  # a replaced buffer is another object
    assert_bits_equal(layer(x), layer(x))
    assert len(calls) == 4
    # The fast accessors (recalibration's per-layer loops) see the same objects and the same cache.
    w, b, g = layer.quant_tensors()
    assert w is layer.weight and b is layer.block_amax and g is layer.global_amax
    assert layer.prepared_kernel_state() is layer.kernel_state()
    assert len(calls) == 4
    layer.fake_quant_backend = "reference"  # kernel_state checks the backend, prepared_kernel_state not
    assert layer.kernel_state() is None and layer.prepared_kernel_state() is not None


def test_launcher_validation(interpret, monkeypatch):
    x, block, g = random_case((4, 32), torch.float32, 0)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fake_quant_triton(x.double(), block, g)
    with pytest.raises(ValueError, match="divisible by block_size=16"):
        fake_quant_triton(torch.zeros(4, 24), torch.zeros(4), g)
    with pytest.raises(ValueError, match="block_amax must have shape"):
        fake_quant_triton(x, block[:, :1], g)
    with pytest.raises(ValueError, match="global_amax must be finite"):
        fake_quant_triton(x, block, float("nan"))
    with pytest.raises(ValueError, match="config must be None or a dict"):
        fake_quant_triton(x, block, g, config={"ROWS": 48, "num_warps": 4})
    with pytest.raises(ValueError, match="config must be None or a dict"):
        fake_quant_stats_triton(x, block, g, config={"ROWS": 64, "num_warps": 2, "TILES": 0})
    with pytest.raises(ValueError, match="config must be None or a dict"):
        fake_quant_triton(x, block, g, config={"ROWS": 64, "num_warps": 2, "STAGES": 2})
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"kernel \(x\) needs a CUDA tensor"):
        fake_quant_triton(x, block, g)
    with pytest.raises(ValueError, match=r"kernel \(x\) needs a CUDA tensor"):
        fake_quant_stats_triton(x, block, g)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 16), (999, 48), (4096, 4096), (3, 11008, 64)], ids=str)
def test_cuda_matches_reference_on_cuda_and_cpu(dtype, shape):
    x, block, g = random_case(shape, dtype, 7, device="cuda")
    out = fake_quant_triton(x, block, g)
    assert_bits_equal(out, fake_quantize_nvfp4(x, block, g))
    assert_bits_equal(out.cpu(), fake_quantize_nvfp4(x.cpu(), block.cpu(), g.cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_stats_mode(dtype):
    x, block, g = random_case((4096, 4096), dtype, 8, device="cuda")
    stats = fake_quant_stats_triton(x, block, g).tolist()
    want = torch_stats(x.cpu(), block.cpu(), g.cpu())  # fp64 sums
    for got, ref in zip(stats, want, strict=True):
        assert math.isclose(got, ref, rel_tol=1e-5)
    assert stats[1] == want[1]


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: config_id(c))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_each_config_and_edge_cases(config, dtype):
    n_blocks = 1000 * span(config) + 5
    x, block, g = random_case((n_blocks, 16), dtype, 3, device="cuda")
    assert_bits_equal(fake_quant_triton(x, block, g, config=config), fake_quantize_nvfp4(x, block, g))
    for x, block, g in (midpoint_walk(dtype, "cuda"), special_values_case(dtype, "cuda")):
        out = fake_quant_triton(x, block, g, config=config)
        assert_bits_equal(out.cpu(), fake_quantize_nvfp4(x.cpu(), block.cpu(), g.cpu()))
    # fp32 subnormal outputs and inputs: tiny global amax (s2 ~ 1e-41), no flush to zero
    x = (torch.randn(64, 64, device="cuda") * 1e-38).to(dtype)
    block, g = max_amax(x)
    assert_bits_equal(
        fake_quant_triton(x, block, g, config=config).cpu(),
        fake_quantize_nvfp4(x.cpu(), block.cpu(), g.cpu()),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_module_uses_kernel_and_matches_torch_path(dtype, monkeypatch):
    from nvfp4_qat.kernels import act_quant

    calls = []
    launch, act_launch = fq.fake_quant_prepared, act_quant.act_quant_prepared
    monkeypatch.setattr(fq, "fake_quant_prepared", lambda *a, **k: calls.append("w") or launch(*a, **k))
    monkeypatch.setattr(
        act_quant, "act_quant_prepared", lambda *a, **k: calls.append("x") or act_launch(*a, **k)
    )
    torch.manual_seed(0)
    cfg = QATConfig(quantize_activations=True, gradient="clipped_ste")
    a = NVFP4Linear(256, 512, device="cuda", dtype=dtype, config=cfg)
    b = NVFP4Linear(256, 512, device="cuda", dtype=dtype, config=cfg)
    b.load_state_dict(a.state_dict())
    b.fake_quant_backend = "reference"
    x = torch.randn(4, 33, 256, device="cuda", dtype=dtype)
    outs = []
    for layer in (a, b):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.float().square().sum().backward()
        outs.append((out, xi.grad, layer.weight.grad))
    assert sorted(calls) == ["w", "x"]  # layer a: the weight kernel and the input kernel (act_quant)
    for u, v in zip(*outs, strict=True):
        assert_bits_equal(u, v)


@pytest.mark.gpu
def test_cuda_compile_matches_eager():
    """Weight-only QAT under torch.compile: the weight fake-quant is an opaque custom op, so the
    compiled weights are bit-identical and the outputs match eager up to bf16 matmul/GELU rounding.
    (W4A4 is not compared: an ulp of difference in Inductor's GELU can move an activation across
    an FP4 midpoint, so only that it compiles and stays finite is checked.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().to(torch.bfloat16)
    quantize_model(model, QATConfig())
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert torch.equal(torch.compile(model[0].fake_quantized_weight)(), model[0].fake_quantized_weight())
    torch.testing.assert_close(compiled, eager)
    compiled.float().square().mean().backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
    w4a4 = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().to(torch.bfloat16)
    quantize_model(w4a4, QATConfig(quantize_activations=True))
    assert torch.isfinite(torch.compile(w4a4)(x)).all()


@pytest.mark.gpu
def test_cuda_recalibrate_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512)).to(torch.bfloat16)
    quantize_model(model, init_calibration="max")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05).add_(0.001)
    gpu = quantize_model(nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512)), init_calibration="max")
    gpu = gpu.to(torch.bfloat16).cuda()
    gpu.load_state_dict(model.state_dict())
    cpu_report, gpu_report = recalibrate(model), recalibrate(gpu)
    for (name, t), t_gpu in zip(model.state_dict().items(), gpu.state_dict().values(), strict=True):
        assert torch.equal(t, t_gpu.cpu()), name
    assert math.isclose(cpu_report.mse_after, gpu_report.mse_after, rel_tol=1e-5)


def test_interpreter_recalibrate_fused_path_matches_reference(interpret, monkeypatch):
    """recalibrate() through the kernels (stats pass, sweep with codes and losses) reports what the
    PyTorch path reports and writes the same scales; the next forward reuses the sweep's bytes."""
    recal = importlib.import_module("nvfp4_qat.recalibration._execute")

    fused_calls, prepare_calls = [], []
    sweep_fused, prepare = recal._sweep_fused, fq.prepare
    monkeypatch.setattr(recal, "_sweep_fused", lambda *a, **k: fused_calls.append(1) or sweep_fused(*a, **k))
    monkeypatch.setattr(fq, "prepare", lambda *a: prepare_calls.append(1) or prepare(*a))
    torch.manual_seed(0)
    models = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32)).to(torch.bfloat16)
        quantize_model(model, QATConfig(init_calibration="max", backend="reference"))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1).add_(0.003)
        for m in model:
            m.fake_quant_backend = backend
        models.append(model)
    ref = recalibrate(models[0], backend="reference")
    fused = recalibrate(models[1], backend="triton")
    assert fused_calls == [1]
    n_prepared = len(prepare_calls)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert_bits_equal(models[1](x), models[0](x))  # the kernels with cached bytes vs PyTorch
    assert len(prepare_calls) == n_prepared  # the sweep's bytes and the batched tables were used
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for r, f in zip(ref.layers, fused.layers, strict=True):
        assert r.changed_fraction == f.changed_fraction > 0
        assert r.global_amax_before == f.global_amax_before and r.global_amax_after == f.global_amax_after
        for field in ("sse_before", "sse_after", "energy"):
            assert math.isclose(getattr(r, field), getattr(f, field), rel_tol=1e-6), field
