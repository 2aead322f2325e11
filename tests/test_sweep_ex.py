"""nvfp4_scale_sweep_ex: the public sweep with its value checks returned as a device flag (no sync)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nvfp4_qat import nvfp4_scale_sweep, nvfp4_scale_sweep_ex
from nvfp4_qat.kernels.sweep import AMAX_SLOTS, launch_info
from nvfp4_qat.sweep import INFO_ALL_ZERO, INFO_BAD_GLOBAL_AMAX, INFO_NONFINITE_X, _info, _raise_if_invalid


def raised_code(amax: float, g: float) -> int:
    """The info code that nvfp4_scale_sweep's host rule implies: which error it raises, 0 if none."""
    x = torch.tensor([math.nan if not math.isfinite(amax) else amax])  # check_finite counts it
    try:
        _raise_if_invalid(x, amax, g)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("global_amax must be finite"):
            return INFO_BAD_GLOBAL_AMAX
        if msg.startswith("x must be finite"):
            return INFO_NONFINITE_X
        assert "every block would quantize to 0" in msg, msg
        return INFO_ALL_ZERO
    return 0


def boundary(amax: float) -> list[float]:
    # global amaxes around the one above which u = max|x| / s2 <= 2**-11 (every block zero), by ulps
    edge = torch.tensor(amax * 2688 * 2**11, dtype=torch.float32).view(torch.int32)
    return (edge + torch.arange(-4, 5, dtype=torch.int32)).view(torch.float32).tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_rules_agree_with_the_raising_rule(device, monkeypatch):
    # The three forms of the check: the host rule nvfp4_scale_sweep raises by, the torch rule of the
    # reference backend (_info) and the Triton kernel of the Triton path (launch_info; interpreted
    # on the CPU), on a grid of values and on the all-zero boundary by ulps.
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    amaxes = [0.0, 2.0**-140, 1e-30, 1e-3, 0.7, 448.0, 3e38, math.inf, math.nan]
    gs = [0.0, -0.0, -1.0, -math.inf, math.nan, math.inf, 2.0**-149, 1e-30, 1e-3, 0.7, 1e3, 1e30, 3.4e38]
    pairs = list(itertools.product(amaxes, gs))
    pairs += [(a, g) for a in (1e-3, 0.7, 2.0**-140) for g in boundary(a)]
    codes = set()
    for amax, g in pairs:
        f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        want = raised_code(float(f32(amax)), float(f32(g)))  # the values as the kernels hold them
        got = _info(f32(amax), f32(g))
        assert got.dtype == torch.int32 and got.shape == () and got.device.type == device
        assert int(got) == want, (amax, g)
        # the kernels' checks: max |x| spread over AMAX_SLOTS slots (NaN recorded as inf), then g
        checks = torch.zeros(AMAX_SLOTS + 1, device=device)
        checks[7], checks[-1] = (math.inf if math.isnan(amax) else amax), g
        info = launch_info(checks)
        assert info.dtype == torch.int32 and info.shape == () and info.device.type == device
        assert int(info) == want, (amax, g)
        codes.add(want)
    assert codes == {0, INFO_NONFINITE_X, INFO_BAD_GLOBAL_AMAX, INFO_ALL_ZERO}


def bad_inputs(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    g = x.abs().amax().float()
    nan_x = x.clone()
    nan_x[1, 5] = math.nan
    inf_x = x.clone()
    inf_x[0, 0] = -math.inf
    return [
        (x, g, 0),
        (nan_x, g, INFO_NONFINITE_X),
        (inf_x, g, INFO_NONFINITE_X),
        (x, -g, INFO_BAD_GLOBAL_AMAX),
        (x, g * math.nan, INFO_BAD_GLOBAL_AMAX),
        (x, g * 0, INFO_ALL_ZERO),
        (x, g * 1e9, INFO_ALL_ZERO),
    ]


def check_ex(x: torch.Tensor, backend: str, method: str = "pruned") -> None:
    for xi, g, code in bad_inputs(x):
        out, info = nvfp4_scale_sweep_ex(xi, g, backend=backend, method=method)
        assert info.dtype == torch.int32 and info.shape == () and info.device == x.device
        assert int(info) == code
        if code == 0:
            assert torch.equal(out, nvfp4_scale_sweep(xi, g, backend=backend, method=method))
        else:
            with pytest.raises(ValueError):
                nvfp4_scale_sweep(xi, g, backend=backend, method=method)


def test_reference_backend_flags_what_the_public_call_raises():
    torch.manual_seed(0)
    check_ex(torch.randn(4, 64) * 0.02, "reference")


@pytest.mark.parametrize("method", ["pruned", "exhaustive"])
def test_triton_interpreter_flags_what_the_public_call_raises(monkeypatch, method):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    check_ex(torch.randn(4, 64).bfloat16() * 0.02, "triton", method)


def test_what_needs_no_gpu_read_still_raises():
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="^x must be"):
        nvfp4_scale_sweep_ex([1.0] * 16, 1.0)
    with pytest.raises(ValueError, match="method"):
        nvfp4_scale_sweep_ex(x, 1.0, method="greedy")
    with pytest.raises(ValueError, match="global_amax"):
        nvfp4_scale_sweep_ex(x, torch.ones(2))
    with pytest.raises(ValueError, match="block_size"):
        nvfp4_scale_sweep_ex(x, 1.0, block_size=0)


@pytest.mark.gpu
def test_cuda_flags_without_a_sync():
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA device")
    torch.manual_seed(0)
    x = (torch.randn(256, 4096, device="cuda") * 0.02).bfloat16()
    check_ex(x, "triton")
    g = x.float().abs().amax()
    nvfp4_scale_sweep_ex(x, g)  # compiled and cached before the sync check
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing torch call raises
    try:
        out, info = nvfp4_scale_sweep_ex(x, g)
        _, info_float = nvfp4_scale_sweep_ex(x, 0.05)  # a number: made on the device by a fill, no copy
        with pytest.raises(RuntimeError, match="synchroniz"):
            nvfp4_scale_sweep(x, g)  # the raising call reads back: the check can fail
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert int(info) == 0 and torch.equal(out, nvfp4_scale_sweep(x, g))
    assert int(info_float) == 0


def test_a_number_beyond_fp32_is_a_bad_global_amax_not_a_crash():
    x = torch.randn(4, 64)
    assert int(nvfp4_scale_sweep_ex(x, 1e40)[1]) == INFO_BAD_GLOBAL_AMAX  # rounds to inf, as a tensor would
    with pytest.raises(ValueError, match="global_amax must be finite"):
        nvfp4_scale_sweep(x, -1e40)
