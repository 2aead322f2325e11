"""The Triton scale-sweep kernels equal the reference sweep bit for bit; the pruning math holds.

CPU tests run the kernels in Triton's interpreter: ``TRITON_INTERPRET=1`` is set per test through
``monkeypatch`` (never leaked) and the launcher builds interpreted copies of the kernels itself, so
the compiled CUDA kernels stay intact in the same process. Tests marked ``gpu`` repeat the parity on
CUDA at larger sizes. Every comparison is ``torch.equal``; failure messages count differing blocks.
"""

from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from nvfp4_qat import fake_quantize_nvfp4, nvfp4_scale_sweep
from nvfp4_qat._sweep_reference import block_losses, sweep_reference
from nvfp4_qat.format import (
    E2M1_MIDPOINTS,
    E2M1_VALUES,
    block_code_bytes,
    e2m1_magnitude,
    fp8_code_values,
    global_scale,
)
from nvfp4_qat.kernels import _interpret
from nvfp4_qat.kernels import _sweep_kernels as K
from nvfp4_qat.kernels._sweep_kernels import _odd_f16
from nvfp4_qat.kernels.sweep import (
    AMAX_SLOTS,
    FIRST_DOUBLING,
    N_BELOW,
    check_values,
    launch_sweep,
    sweep_triton,
    words_pass,
)
from nvfp4_qat.sweep import _read_checks

METHODS = ["pruned", "exhaustive"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
VALUES = fp8_code_values()


def cfg_id(cfg) -> str:
    cap = f"r{cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else ""
    return f"B{cfg.kwargs['BLOCK_B']}w{cfg.num_warps}{cap}"


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_same_blocks(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.device == ref.device
    n = int((out != ref).sum())
    assert n == 0, f"{n} of {ref.numel()} blocks differ from the reference"
    assert torch.equal(out, ref)


def amax(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax()


def random_weight(shape, dtype, seed, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 0.02
    x.view(-1)[::97] *= 30  # a few large elements: blocks at very different scales
    return x.to(device=device, dtype=dtype)


def adversarial_blocks(seed: int = 0) -> torch.Tensor:
    """(n, 16) fp32 blocks, global max 4.0: the cases the foundation issue lists, and more."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    s2 = global_scale(torch.tensor(4.0))
    ordinary = rnd(8, 16) * 0.5
    ordinary[0, 3] = 4.0  # the block that holds the global max
    small = torch.cat([rnd(8, 16) * 4e-5, rnd(8, 16) * 4e-6, rnd(4, 16) * 4e-7])  # FP8-subnormal best
    equal = torch.tensor([4.0, 1.0, 0.3, 1e-3, 3e-5]).repeat_interleave(16).reshape(5, 16)
    codes = VALUES[torch.randint(0, 126, (8,), generator=gen)]
    q = torch.tensor(E2M1_VALUES)[torch.randint(0, 8, (8, 16), generator=gen)]
    on_grid = q * (codes[:, None] * s2)  # exactly what fake-quant yields at those codes
    single = torch.zeros(6, 16)
    single[torch.arange(6), torch.arange(6)] = torch.tensor([4.0, -1.0, 0.01, 3e-5, 1e-7, -2.5])
    heavy = (rnd(8, 16) / rnd(8, 16)).clamp(-4.0, 4.0)  # Cauchy tails
    outlier = rnd(8, 16) * 0.05
    outlier[:, 0] = torch.linspace(0.2, 1.0, 8)  # one element far above the rest
    return torch.cat([ordinary, small, equal, on_grid, single, torch.zeros(2, 16), heavy, outlier])


def all_losses(blocks: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Reference loss of every block at every code, fp32 (n, 126)."""
    absw = blocks.float().abs()
    s2 = global_scale(g)
    u = absw / s2
    return torch.stack([block_losses(absw, u, VALUES[k], s2) for k in range(126)], dim=1)


# --- the math the pruned kernel relies on, checked on the reference -------------------------


def test_first_doubling_index_is_the_first_normal_code():
    smallest_normal = torch.finfo(torch.float8_e4m3fn).smallest_normal
    assert FIRST_DOUBLING == int((VALUES < smallest_normal).sum()) == 7
    k = torch.arange(FIRST_DOUBLING, 126 - 8)
    assert torch.equal(VALUES[k + 8], 2 * VALUES[k])
    assert VALUES[FIRST_DOUBLING + 7] != 2 * VALUES[FIRST_DOUBLING - 1]
    # Below it halving a candidate does not always give a candidate (odd subnormals).
    assert not bool(torch.isin(VALUES[FIRST_DOUBLING + 1] / 2, VALUES))


def _dists(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, 16, generator=gen)
    return {
        "gauss-bf16": (g * 0.02).bfloat16().float(),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((n, 16)),
        "student3": torch.distributions.StudentT(3.0).sample((n, 16)),
        "uniform": torch.rand(n, 16, generator=gen) * 2 - 1,
    }


@pytest.mark.parametrize("dist", ["gauss-bf16", "laplace", "student3", "uniform"])
def test_doubling_never_lowers_the_loss_of_a_non_saturating_code(dist):
    blocks = _dists(2048, 1)[dist]
    g = amax(blocks) * 64  # 6 spare octaves above every block: many non-saturating pairs
    losses = all_losses(blocks, g)
    u_max = blocks.abs().amax(1) / global_scale(g)
    k0 = torch.searchsorted(6 * VALUES, u_max)  # first code with 6 v >= u_max
    k = torch.arange(126 - 8)
    pairs = (k[None] >= k0[:, None]) & (k[None] >= FIRST_DOUBLING)
    lower = losses[:, 8:] < losses[:, :-8]  # loss(2v) < loss(v)
    assert int(pairs.sum()) > 50_000
    assert int((lower & pairs).sum()) == 0
    # So the first minimum is never at or above k0 + 8.
    best = losses.argmin(1)
    assert int((best >= k0 + 8).sum()) == 0


@pytest.mark.parametrize("dist", ["gauss-bf16", "student3"])
def test_saturation_bound_holds_and_grows_downwards(dist):
    blocks = _dists(2048, 2)[dist]
    g = amax(blocks)
    s2 = global_scale(g)
    losses = all_losses(blocks, g)
    m = blocks.abs().amax(1, keepdim=True)
    bound = (m - 6 * (VALUES[None] * s2)).clamp(min=0) ** 2  # (n, 126), fp32 as the kernel
    assert bool((losses >= bound).all())
    assert bool((bound[:, :-1] >= bound[:, 1:]).all())


@pytest.mark.parametrize("dist", ["gauss-bf16", "laplace", "student3", "uniform"])
def test_window_and_bound_find_the_reference_argmin(dist):
    blocks = _dists(2048, 3)[dist]
    g = amax(blocks)
    s2 = global_scale(g)
    losses = all_losses(blocks, g)
    m = blocks.abs().amax(1)
    k0 = torch.searchsorted(6 * VALUES, m / s2)
    start = (k0 - N_BELOW).clamp(0, 126 - (N_BELOW + 8))
    k = torch.arange(126)
    window = (k[None] >= start[:, None]) & (k[None] < start[:, None] + N_BELOW + 8)
    best_w = torch.where(window, losses, torch.inf).argmin(1)
    gap = (m - 6 * (VALUES[(start - 1).clamp(min=0)] * s2)).clamp(min=0)
    flagged = ((start > 0) & ~(gap * gap > losses.gather(1, best_w[:, None])[:, 0])) | (k0 < FIRST_DOUBLING)
    assert float(flagged.float().mean()) < 0.01  # the second pass stays small
    assert torch.equal(best_w[~flagged], losses.argmin(1)[~flagged])


def doubling_violations(s2: torch.Tensor, offsets: int = 16) -> tuple[int, int]:
    """Elements whose error at ``2v`` is below their error at ``v``, near every midpoint of ``v``.

    Everything scales exactly by powers of two in fp32's normal range, so codes ``v`` in [1, 2)
    and ``s2`` in [1, 2) stand for all: for each ``s2`` given, each of the 8 codes and each of
    the 7 midpoints, the ``2 * offsets + 1`` floats ``x`` around ``midpoint * v * s2`` are scored
    exactly as the reference scores them. Returns ``(violations, elements checked)``.
    """
    v = VALUES[(VALUES >= 1) & (VALUES < 2)].to(s2.device)  # 1, 1.125, ..., 1.875
    mids = torch.tensor([m for m, _ in E2M1_MIDPOINTS], device=s2.device)
    sh = (-1, 1, 1, 1)
    s2_, v_, mid_ = s2.reshape(sh), v.reshape(1, -1, 1, 1), mids.reshape(1, 1, -1, 1)
    center = (mid_.double() * v_.double() * s2_.double()).float()  # (n, 8, 7, 1)
    off = torch.arange(-offsets, offsets + 1, dtype=torch.int32, device=s2.device)
    x = (center.view(torch.int32) + off).view(torch.float32)
    u = x / s2_

    def err(code):
        d = x - e2m1_magnitude(u, code) * (code * s2_)
        return d * d

    return int((err(2 * v_) < err(v_)).sum()), x.numel()


def test_no_element_near_a_midpoint_breaks_the_doubling_order():
    gen = torch.Generator().manual_seed(4)
    mantissas = torch.randint(0, 2**23, (512,), generator=gen, dtype=torch.int32)
    s2 = (mantissas + 0x3F800000).view(torch.float32)  # random s2 in [1, 2)
    violations, checked = doubling_violations(s2)
    assert checked > 900_000
    assert violations == 0


def _odd_copy_fn(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _odd_f16(tl.load(u_ptr + i, mask=i < n, other=0.0)), mask=i < n)


def odd_copy(u: torch.Tensor) -> torch.Tensor:
    """The kernels' fp16 decision copy of ``u`` (``_odd_f16``), compiled on CUDA, else interpreted."""
    if u.is_cuda:
        kernel = triton.jit(_odd_copy_fn)
    else:  # resolve _odd_f16 to its interpreted copy, as the launcher does for the kernels
        ns = dict(_interpret._namespace(K.__name__))
        kernel = InterpretedFunction(types.FunctionType(_odd_copy_fn.__code__, ns, "_odd_copy_fn"))
    out = torch.empty(u.shape, dtype=torch.float16, device=u.device)
    kernel[(triton.cdiv(u.numel(), 1024),)](u, out, u.numel(), BLOCK=1024)
    return out


def decision_probe_values() -> tuple[torch.Tensor, torch.Tensor]:
    """(every decision threshold midpoint * v, fp32 ascending; u values that probe them, fp32)."""
    t = torch.sort((torch.tensor([m for m, _ in E2M1_MIDPOINTS])[:, None] * VALUES).reshape(-1)).values
    bits = t.view(torch.int32)
    near = bits[:, None] + torch.arange(-40, 41, dtype=torch.int32)  # every fp32 within 40 ulps
    # the fp16 grid points around each threshold (where truncation lands), +-3 fp32 ulps of each
    grid = t.half()[:, None].float() * (1 + torch.tensor([-3, -2, -1, 1, 2, 3]) * 2.0**-10)
    around = grid.reshape(-1, 1).view(torch.int32) + torch.arange(-3, 4, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    spread = torch.exp2(torch.rand(200_000, generator=gen, dtype=torch.float64) * 60 - 35).float()
    edges = torch.tensor([2.0**-14, 2.0**-11, 2240.0, 32768.0, 65504.0, 65520.0]).view(torch.int32)
    edges = (edges[:, None] + torch.arange(-2, 3, dtype=torch.int32)).view(torch.float32)
    specials = torch.tensor([0.0, 2.0**-149, 2.0**-24, 1e30, float("inf")])
    u = torch.cat([near.view(torch.float32).reshape(-1), around.view(torch.float32).reshape(-1), spread,
                   edges.reshape(-1), specials])  # fmt: skip
    return t, u


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp16_decision_copy_decides_every_threshold_like_fp32(device):
    # The kernels compare an fp16 "round to odd" copy of u with the thresholds midpoint * v. For
    # every threshold of every code and u at and around each (and across the whole range), the
    # number of thresholds below u, and at or below u, is the same for the copy as for u: so every
    # decision of both tie rules agrees.
    t, u = decision_probe_values()
    assert torch.equal(t.half().float(), t)  # every threshold is an fp16 number
    assert t.min() == 2.0**-11 and t.max() == 2240.0
    uh = odd_copy(u.to(device)).cpu().float()
    assert not uh.isnan().any()
    for side in ("left", "right"):  # count of t < u, count of t <= u
        want = torch.searchsorted(t, u, side=side)
        got = torch.searchsorted(t, uh, side=side)
        assert torch.equal(got, want), f"{int((got != want).sum())} of {u.numel()} values decide differently"


# --- kernels under the interpreter (CPU) ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_blocks", [1, 7, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interpreter_matches_reference(interpret, dtype, n_blocks, seed, method):
    x = random_weight((n_blocks, 16), dtype, seed)
    g = amax(x)
    assert_same_blocks(nvfp4_scale_sweep(x, g, backend="triton", method=method), sweep_reference(x, g))


@pytest.mark.parametrize("cfg", K.PRUNED_CONFIGS, ids=cfg_id)
def test_interpreter_pruned_partial_tile_every_config(interpret, cfg):
    # 69 blocks leave a partial last tile for every tile size (32, 64, 128); 40 tiny blocks are
    # flagged, which spans two work-list tiles (the second one partial).
    x = torch.cat(
        [random_weight((29, 16), torch.float32, 5), random_weight((40, 16), torch.float32, 6) * 1e-6]
    )
    g = amax(x)
    out, count, _ = launch_sweep(x, g, "pruned", config=cfg)
    assert int(count) >= 40
    assert_same_blocks(out, sweep_reference(x, g))


@pytest.mark.parametrize("cfg", K.EXHAUSTIVE_CONFIGS, ids=cfg_id)
def test_interpreter_exhaustive_partial_tile_every_config(interpret, cfg):
    x = random_weight((69, 16), torch.bfloat16, 7)  # a partial last tile for 32, 64 and 128
    g = amax(x)
    out, _, _ = launch_sweep(x, g, "exhaustive", config=cfg)
    assert_same_blocks(out, sweep_reference(x, g))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_interpreter_adversarial_blocks(interpret, dtype, method):
    x = adversarial_blocks().to(dtype)
    g = amax(x)
    out, count, _ = launch_sweep(x, g, method)
    assert_same_blocks(out, sweep_reference(x, g))
    if method == "pruned":  # the second pass ran, and not for everything
        assert 0 < int(count) < x.shape[0]


def mixed_weight(n_blocks: int, seed: int, device="cpu") -> torch.Tensor:
    """Gaussian blocks, blocks with one outlier (their optimum saturates it: far below k0), and
    FP8-subnormal blocks, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 16, generator=gen) * 0.02
    third = n_blocks // 3
    x[:third, 0] = 0.1 * (1 + torch.rand(third, generator=gen))
    x[third : third + n_blocks // 20] *= 1e-5
    return x[torch.randperm(n_blocks, generator=gen)].to(device)


@pytest.mark.parametrize(("n_below", "n_extra"), [(0, 0), (1, 0), (1, 3), (3, 2)])
def test_interpreter_shallow_windows_stay_exact(interpret, n_below, n_extra):
    # A shallower window leaves more blocks to the bound, the extra codes and the second pass;
    # the answer must not change.
    x = mixed_weight(600, 13)
    g = amax(x)
    out, count, _ = launch_sweep(x, g, "pruned", n_below=n_below, n_extra=n_extra)
    assert_same_blocks(out, sweep_reference(x, g))
    n_subnormal = 30  # the 1e-5 blocks always go to the second pass
    if (n_below, n_extra) == (0, 0):
        assert int(count) > n_subnormal + 50  # the bound failed for many blocks
    if n_extra == 3:
        assert int(count) < launch_sweep(x, g, "pruned", n_below=n_below, n_extra=0)[1]


def check_stats_outputs(x, g, method, **kw) -> None:
    """launch_sweep(stats=True): the same amax, each block's FP8 byte of it, the fp32 loss total and
    the number of bytes that differ from the old ones."""
    n = x.numel() // 16
    gen = torch.Generator().manual_seed(0)
    old = torch.randint(0, 127, (n,), generator=gen, dtype=torch.uint8).to(x.device)
    out, _, (codes, part) = launch_sweep(x, g, method, stats=True, buffers={"old": old}, **kw)
    assert_same_blocks(out, sweep_reference(x, g))
    assert torch.equal(codes, block_code_bytes(out, global_scale(g)))
    assert _read_checks(check_values(part)) == (float(x.abs().max()), float(g))  # what the public call checks
    old[: n // 2] = codes[: n // 2]  # half the blocks unchanged
    out, _, (codes, part) = launch_sweep(x, g, method, stats=True, buffers={"old": old}, **kw)
    assert int(part[1].sum()) == int((codes != old).sum()) > 0
    xf = x.float().reshape(-1, 16)
    want = float((fake_quantize_nvfp4(xf, out, g) - xf).double().square().sum())
    assert abs(float(part[0].double().sum()) - want) <= 1e-6 * want


@pytest.mark.parametrize(
    ("method", "n_below", "n_extra"), [("exhaustive", 3, 2), ("pruned", 3, 2), ("pruned", 0, 0)]
)
def test_interpreter_stats_outputs(interpret, method, n_below, n_extra):
    # (0, 0) sends many blocks through the work list, whose stores are checked too
    x = mixed_weight(600, 14)
    check_stats_outputs(x, amax(x), method, n_below=n_below, n_extra=n_extra)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "n_below", "n_extra"), [("exhaustive", 3, 2), ("pruned", 3, 2), ("pruned", 0, 0)]
)
def test_cuda_stats_outputs(method, n_below, n_extra):
    x = mixed_weight(60000, 15, device="cuda")
    check_stats_outputs(x, amax(x), method, n_below=n_below, n_extra=n_extra)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_interpreter_non_finite_global_amax_writes_nothing(interpret, method, bad):
    # How recalibration skips a layer with NaN/Inf weights without a host sync: its sweep is
    # launched with a non-finite global amax and must leave every output as it was.
    x = mixed_weight(300, 16)
    n = x.numel() // 16
    sentinel = torch.full((n,), 0.125)
    buffers = {
        "out": sentinel.clone(),
        "codes": torch.full((n,), 7, dtype=torch.uint8),
        "old": torch.zeros(n, dtype=torch.uint8),
        "partials": torch.full((3, 40), -1.0),
        "count": torch.zeros(1, dtype=torch.int32),
    }
    out, count, _ = launch_sweep(
        x, torch.tensor(bad), method, stats=True, buffers=buffers, n_below=0, n_extra=0
    )
    assert torch.equal(out, sentinel) and out is buffers["out"]
    assert torch.equal(buffers["codes"], torch.full((n,), 7, dtype=torch.uint8))
    assert count is None or int(count) == 0  # nothing flagged for the work list
    # one program under the interpreter (1024-block tile): it wrote zero loss and zero changes
    assert torch.equal(buffers["partials"][:2, 0], torch.zeros(2))
    # the same buffers with the finite amax: now written (the sweep's result)
    out, _, _ = launch_sweep(x, amax(x), method, stats=True, buffers=buffers)
    assert_same_blocks(out, sweep_reference(x, amax(x)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: 0/0 and overflow, as intended
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["zero-tensor", "amax-too-small", "amax-huge", "s2-tiny", "losses-overflow"])
def test_interpreter_extreme_global_amax(interpret, case, method):
    x = random_weight((48, 16), torch.float32, 8)
    g = amax(x)
    if case == "zero-tensor":
        x, g = torch.zeros_like(x), torch.tensor(0.0)
    elif case == "amax-too-small":  # every code saturates the largest blocks (k0 = 126)
        g = g / 64
    elif case == "amax-huge":
        g = torch.tensor(1e30)
    elif case == "s2-tiny":  # s2 below 2**-100: every block goes to the exhaustive pass
        x = x * 1e-30
        g = amax(x)
    else:  # squared errors overflow to inf
        x = x * 1e37 / g
        g = amax(x)
    out, count, _ = launch_sweep(x, g, method)
    assert_same_blocks(out, sweep_reference(x, g))
    if case == "s2-tiny" and method == "pruned":
        assert int(count) == x.shape[0]


@pytest.mark.parametrize("offset", [0, 1, 2, 3, -1, -2, -3])
def test_interpreter_elements_near_a_midpoint_need_no_second_pass(interpret, offset):
    # s2 = 2**-4 keeps every product exact, so u is exactly `offset` ulps from 0.75 * v and from
    # 1.25 * v, where float32 decisions are closest to disagreeing with float32 errors. The window
    # alone is exact there (the doubling order holds, see the enumeration above): nothing flagged.
    g = torch.tensor(2688.0 / 16)
    s2 = global_scale(g)
    v = VALUES[60:68]  # normal codes
    rows = (6 * v * s2)[:, None].repeat(1, 16)  # max element on the grid at v: k0 = that code
    for j, mid in enumerate([0.75, 1.25]):
        target = (mid * v).view(torch.int32) + offset
        rows[:, 1 + j] = target.view(torch.float32) * s2
    out, count, _ = launch_sweep(rows, g, "pruned")
    assert int(count) == 0
    assert_same_blocks(out, sweep_reference(rows, g))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["strided", "transposed", "3d"])
def test_interpreter_non_contiguous_and_3d(interpret, layout, method):
    base = random_weight((16, 128), torch.bfloat16, 9)
    x = {"strided": base[:, ::2], "transposed": base[:, :64].t(), "3d": base.reshape(2, 8, 128)}[layout]
    g = amax(x)
    assert_same_blocks(nvfp4_scale_sweep(x, g, backend="triton", method=method), sweep_reference(x, g))


# --- dispatch and validation ------------------------------------------------------------------


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = random_weight((4, 16), torch.float32, 0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nvfp4_scale_sweep(x, amax(x), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sweep_triton(x, amax(x))


@pytest.mark.parametrize("method", ["pruned", "exhaustive"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_interpreter_partials_max_abs_x(interpret, method, bad):
    """Row 2 of the partials: each tile's max |x| spread over AMAX_SLOTS columns by atomic max (+inf
    for a tile with NaN/Inf), the global amax after them, and nothing else written; the public call
    raises."""
    x = random_weight((32, 128), torch.float32, 3)
    cfg = K.PRUNED_CONFIGS[0] if method == "pruned" else K.EXHAUSTIVE_CONFIGS[0]
    tile = cfg.kwargs["BLOCK_B"] * 16
    x[1, 5] = bad  # tile 0

    def row2(x):
        _, _, (_, part) = launch_sweep(x, torch.tensor([2.5]), method, config=cfg)
        return part[2]

    tiles = x.reshape(-1, tile).abs().nan_to_num(nan=float("inf"), posinf=float("inf")).amax(dim=1)
    got = row2(x)
    want = torch.zeros(got.numel())
    want[: len(tiles)] = tiles  # fewer tiles than AMAX_SLOTS here: one column each
    want[AMAX_SLOTS] = 2.5
    assert len(tiles) < AMAX_SLOTS and torch.equal(got, want)
    assert _read_checks(check_values(got.expand(3, -1))) == (float("inf"), 2.5)
    assert _read_checks(check_values(row2(x[:, 16:]).expand(3, -1))) == (float(x[:, 16:].abs().max()), 2.5)
    with pytest.raises(ValueError, match="x must be finite, but 1 of 4096"):
        nvfp4_scale_sweep(x, 1.0, backend="triton", method=method)


@pytest.mark.parametrize(
    "partials",
    [torch.zeros(2, 40), torch.zeros(3, 33), torch.zeros(3, 40, dtype=torch.float64), torch.zeros(120)],
    ids=["two-rows", "too-few-columns", "float64", "1-d"],
)
def test_launch_sweep_refuses_a_partials_buffer_it_would_overrun(interpret, partials):
    """The kernels write all three rows of the partials (row 2: max |x| and the global amax); a
    buffer of the old two-row shape, or too narrow, is refused before anything is launched."""
    x = random_weight((8, 64), torch.float32, 5)
    with pytest.raises(ValueError, match=r"buffers\['partials'\] must be fp32 \[3, >= 34\]"):
        launch_sweep(x, amax(x), "pruned", stats=True, buffers={"old": torch.zeros(32, dtype=torch.uint8),
                                                                 "partials": partials})  # fmt: skip


@pytest.mark.parametrize("g", [float("nan"), -1.0, 0.0, 1e12])
def test_interpreter_public_call_refuses_bad_global_amax(interpret, g):
    """The checks that follow the launch: a NaN, negative, zero or far too large global amax."""
    x = random_weight((8, 64), torch.float32, 4)
    match = "finite and >= 0" if g != g or g < 0 else "every block would quantize to 0"
    with pytest.raises(ValueError, match=match):
        nvfp4_scale_sweep(x, torch.tensor(g), backend="triton")

    # Near the bound (u = max|x| / s2 at 2**-11, decided in fp32 on the host after the launch) the
    # Triton path decides as the reference path does (on the device, before its sweep).
    def refused(backend: str, g: float) -> bool:
        try:
            nvfp4_scale_sweep(x, g, backend=backend)
        except ValueError as e:
            assert "every block would quantize to 0" in str(e)
            return True
        return False

    edge = float(x.abs().max()) * 2688 * 2**11
    decisions = []
    for factor in (0.99, 1 - 2e-7, 1 - 6e-8, 1.0, 1 + 6e-8, 1 + 2e-7, 1.01):
        decisions.append(refused("triton", edge * factor))
        assert decisions[-1] == refused("reference", edge * factor), factor
    assert decisions[0] is False and decisions[-1] is True


def test_auto_dispatch(monkeypatch):
    calls = []

    def fake(x, g, method):
        calls.append(method)
        part = torch.zeros(3, AMAX_SLOTS + 1)
        part[2, 0], part[2, -1] = x.abs().max(), g  # what the public call validates x from
        return sweep_reference(x, g), None, (None, part)

    monkeypatch.setattr("nvfp4_qat.kernels.sweep.launch_sweep", fake)
    x = random_weight((4, 16), torch.float32, 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nvfp4_scale_sweep(x, amax(x))  # CPU without the interpreter: the reference
    assert calls == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nvfp4_scale_sweep(x, amax(x), method="exhaustive")  # the interpreter counts as a Triton device
    assert calls == ["exhaustive"]


def test_sweep_triton_refuses_bad_input(interpret):
    x = random_weight((4, 16), torch.float32, 0)
    with pytest.raises(ValueError, match="method"):
        sweep_triton(x, amax(x), method="fast")
    with pytest.raises(ValueError, match="method"):
        nvfp4_scale_sweep(x, amax(x), backend="triton", method="fast")
    with pytest.raises(TypeError, match="x must"):
        sweep_triton(x.to(torch.int32), amax(x))
    with pytest.raises(ValueError, match="divisible by block_size=16"):
        sweep_triton(x.reshape(8, 8), amax(x))
    with pytest.raises(TypeError, match="global_amax"):
        sweep_triton(x, 1.0)


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_blocks", [1, 7, 1024, 262_147])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_reference(dtype, n_blocks, seed, method):
    x = random_weight((n_blocks, 16), dtype, seed, device="cuda")
    g = amax(x)
    assert_same_blocks(nvfp4_scale_sweep(x, g, backend="triton", method=method), sweep_reference(x, g))


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_large_weight(method):
    x = random_weight((4096, 4096), torch.bfloat16, 3, device="cuda")
    g = amax(x)
    assert_same_blocks(sweep_triton(x, g, method), sweep_reference(x, g))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "cfg"),
    [("pruned", c) for c in K.PRUNED_CONFIGS] + [("exhaustive", c) for c in K.EXHAUSTIVE_CONFIGS],
    ids=lambda p: p if isinstance(p, str) else cfg_id(p),
)
def test_cuda_partial_tile_every_config(method, cfg):
    x = torch.cat([random_weight((128 * 997, 16), torch.bfloat16, 10), adversarial_blocks().bfloat16()])
    x = x.cuda()  # 127,616 + 69 blocks: a partial last tile for every tile size
    g = amax(x)
    out, _, _ = launch_sweep(x, g, method, config=cfg)
    assert_same_blocks(out, sweep_reference(x, g))


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_adversarial_and_layouts(dtype, method):
    for seed in range(3):
        x = adversarial_blocks(seed).to(device="cuda", dtype=dtype).repeat(50, 1)
        assert_same_blocks(sweep_triton(x, amax(x), method), sweep_reference(x, amax(x)))
    base = random_weight((512, 1024), dtype, 11, device="cuda")
    for x in (base[:, ::2], base[:, :512].t(), base.reshape(4, 128, 1024)):
        assert_same_blocks(sweep_triton(x, amax(x), method), sweep_reference(x, amax(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["zero-tensor", "amax-too-small", "amax-huge", "s2-tiny", "losses-overflow"])
def test_cuda_extreme_global_amax(case, method):
    x = random_weight((4096, 16), torch.float32, 8, device="cuda")
    g = amax(x)
    if case == "zero-tensor":
        x, g = torch.zeros_like(x), torch.zeros((), device="cuda")
    elif case == "amax-too-small":
        g = g / 64
    elif case == "amax-huge":
        g = torch.tensor(1e30, device="cuda")
    elif case == "s2-tiny":
        x = x * 1e-30
        g = amax(x)
    else:
        x = x * 1e37 / g
        g = amax(x)
    assert_same_blocks(sweep_triton(x, g, method), sweep_reference(x, g))


@pytest.mark.gpu
@pytest.mark.parametrize(("n_below", "n_extra"), [(0, 0), (1, 0), (1, 3)])
def test_cuda_shallow_windows_stay_exact(n_below, n_extra):
    x = mixed_weight(300_000, 14, device="cuda")
    g = amax(x)
    out, _, _ = launch_sweep(x, g, "pruned", n_below=n_below, n_extra=n_extra)
    assert_same_blocks(out, sweep_reference(x, g))


@pytest.mark.gpu
def test_cuda_pruned_second_pass_is_small_and_interpreter_agrees(monkeypatch):
    x = random_weight((2048, 4096), torch.bfloat16, 12, device="cuda")
    out, count, _ = launch_sweep(x, amax(x), "pruned")
    assert int(count) < 1e-3 * out.numel()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    small = x[:64].cpu()
    cpu_out, _, _ = launch_sweep(small, amax(x).cpu(), "pruned")
    assert_same_blocks(cpu_out, out[: small.numel() // 16].cpu())


@pytest.mark.gpu
def test_cuda_doubling_order_holds_for_every_s2_mantissa():
    # All 2**23 fp32 mantissas of s2, 8 codes, 7 midpoints, 33 floats around each: no element
    # scores lower at 2v than at v, so the pruned kernel needs no guard for near-midpoint elements.
    total = 0
    for start in range(0, 2**23, 2**16):
        m = torch.arange(start, start + 2**16, dtype=torch.int32, device="cuda")
        violations, checked = doubling_violations((m + 0x3F800000).view(torch.float32))
        assert violations == 0, f"{violations} violations for s2 mantissas from {start}"
        total += checked
    assert total == 2**23 * 8 * 7 * 33


@pytest.mark.gpu
def test_cuda_direct_launch_is_cached_per_specialization():
    # After the first launch of a specialization, launches bypass JITFunction.run (see
    # kernels._launch). A pointer that is not 16-byte aligned and a block count that is
    # not a multiple of 16 specialize the kernel differently: they must get their own compiled
    # kernel, never the aligned one, and every result must still equal the reference.
    from nvfp4_qat.kernels import _launch

    flat = random_weight((1, 64 * 1024 + 16), torch.bfloat16, 21, device="cuda").reshape(-1)
    cases = [flat[: 64 * 1024].reshape(64, 1024), flat[1 : 1 + 16 * 999].reshape(999, 16),
             flat[2 : 2 + 16 * 999].reshape(999, 16)]  # fmt: skip
    assert cases[0].data_ptr() % 16 == 0 and cases[1].data_ptr() % 16 != 0
    # The third is 4-byte aligned: bf16 pass (its words) without 16-byte alignment, where the second
    # (2-byte aligned) takes the pass without it.
    assert cases[2].data_ptr() % 4 == 0 and cases[2].data_ptr() % 16 != 0
    seen = []
    for x in cases:
        g = amax(x)
        want = sweep_reference(x, g)
        for _ in range(3):  # the first compiles or loads, the next two take the direct path
            out = torch.full((x.numel() // 16,), float("nan"), device="cuda")  # a launch must fill it
            assert_same_blocks(launch_sweep(x, g, "pruned", buffers={"out": out})[0], want)
            assert_same_blocks(nvfp4_scale_sweep(x, g), want)
        assert _launch._compiled is not None, "the direct launch path was disabled"
        seen.append({k for k in _launch._compiled if k[0] is K._sweep_pruned_kernel})
    assert seen[0] < seen[1], "the misaligned weight reused the aligned weight's compiled kernel"
    if words_pass(cases[2].reshape(-1), "pruned"):  # sm_90: the bf16 pass is another kernel
        assert seen[1] < seen[2], "the bf16 pass reused the other pass's compiled kernel"


def test_direct_launch_yields_to_launch_hooks():
    # kernels._launch launches directly only while no Triton launch hook is set: Triton 3.6+ holds
    # an (empty) HookChain, older versions None or a callable.
    from triton.knobs import HookChain

    from nvfp4_qat.kernels._launch import _hooked

    chain = HookChain()
    assert not _hooked(None) and not _hooked(chain)
    chain.add(print)
    assert _hooked(chain) and _hooked(lambda *a, **k: None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("s2", [0.75 * 2.0**-90, 2.0**-90, 1.5 * 2.0**-90, 1.25 * 2.0**-60])
def test_pruned_pass_at_and_above_the_tiny_s2_bound(monkeypatch, device, s2):
    # s2 = global_amax / 2688 below, at and above 2**-90, the bound under which every block goes to
    # the exhaustive pass (the pruned pass's division without a divide is proven from there up),
    # and where the pruned pass decides every block (at 2**-90 itself most squared errors
    # underflow to 0, and the blocks whose bound cannot be shown go to the exhaustive pass too):
    # equal to the reference every time.
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.tensor(2688 * s2, device=device)
    assert float(g / 2688) == s2  # exact: the s2 the kernels compute
    w = random_weight((64, 256), torch.float32, 22)
    x = (w * (float(g) / float(amax(w)))).to(device)  # max |x| = global_amax, to rounding
    out, count, _ = launch_sweep(x, g, "pruned")
    assert_same_blocks(out, sweep_reference(x, g))
    n_blocks = x.numel() // 16
    if s2 < 2.0**-90:
        assert int(count) == n_blocks
    elif s2 > 2.0**-80:
        assert int(count) == 0
