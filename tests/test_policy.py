"""Recalibration policies: criteria, acceptance rules, their inputs, and what they refuse."""

import math

import pytest
import torch
from torch import nn

from nvfp4_qat import quantize_model, recalibrate
from nvfp4_qat._sweep_reference import pairwise_block_sum, sweep_reference
from nvfp4_qat.format import (
    block_code_bytes,
    e2m1_magnitude,
    fake_quantize_unchecked,
    fp8_code_values,
    global_scale,
)
from nvfp4_qat.modules import max_block_amax
from nvfp4_qat.policy import (
    POLICIES,
    InputMoments,
    RecalibrationPolicy,
    adam_moments,
    policy_scales,
    resolve_policy,
)
from nvfp4_qat.quantize import nvfp4_layers


def block_sse(w: torch.Tensor, block_amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-block squared NVFP4 error, summed in the sweep's pairwise order."""
    wf = w.float().reshape(-1, 16)
    return pairwise_block_sum((fake_quantize_unchecked(wf, block_amax, g, 16) - wf).square())


def weight(rows=8, cols=64, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen)


# --- the policy object --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"criterion": "hessian"},
            r"criterion must be one of \('mse', 'activation', 'gradient'\), got 'hessian'",
        ),
        ({"min_gain": -0.1}, r"min_gain must be a finite number >= 0, got -0.1"),
        ({"min_gain": math.nan}, r"min_gain must be a finite number >= 0, got nan"),
        ({"min_gain": math.inf}, r"min_gain must be a finite number >= 0, got inf"),
        ({"min_gain": True}, r"min_gain must be a finite number >= 0, got True"),
        ({"max_code_step": 0}, r"max_code_step must be None or an int >= 1, got 0"),
        ({"keep_global_amax": 1}, r"keep_global_amax must be a bool, got 1"),
        ({"loss_check": True}, r"loss_check must be one of \('off', 'model', 'layer'\), got True"),
    ],
)
def test_policy_fields_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecalibrationPolicy(**kwargs)


def test_resolve_policy():
    assert resolve_policy("mse") is POLICIES["mse"]
    assert resolve_policy("mse").is_plain_sweep
    assert not resolve_policy("mse_keep_global").is_plain_sweep
    custom = RecalibrationPolicy(min_gain=0.2)
    assert resolve_policy(custom) is custom
    with pytest.raises(ValueError, match=r"policy must be one of \('mse', .*got 'best'"):
        resolve_policy("best")
    with pytest.raises(TypeError, match=r"policy must be a preset name or a RecalibrationPolicy, got int"):
        resolve_policy(3)


# --- criteria -----------------------------------------------------------------------------------


def test_mse_criterion_reaches_the_sweeps_minimum_in_every_block():
    w = weight()
    g, b_max = max_block_amax(w)
    b_sweep = sweep_reference(w, g).reshape(b_max.shape)
    b_policy = policy_scales(w, b_max, g, g, RecalibrationPolicy(keep_global_amax=True))
    # Same minimal loss per block (a block may keep an equally good code where the sweep, which
    # prefers the smallest code, picked another one).
    assert torch.equal(block_sse(w, b_policy, g), block_sse(w, b_sweep, g))
    assert (block_sse(w, b_policy, g) < block_sse(w, b_max, g)).any()  # something improved


def test_min_gain_switches_only_blocks_that_gain_that_much():
    w = weight(seed=1)
    g, b_max = max_block_amax(w)
    before = block_sse(w, b_max, g)
    best = block_sse(w, sweep_reference(w, g), g)
    gain = 1 - best / before
    b = policy_scales(w, b_max, g, g, RecalibrationPolicy(keep_global_amax=True, min_gain=0.05))
    switched = b.reshape(-1) != b_max.reshape(-1)
    assert torch.equal(switched, gain > 0.05)
    assert 0 < int(switched.sum()) < switched.numel()  # the threshold matters on this weight


def test_activation_criterion_with_flat_moments_is_the_mse_criterion():
    w = weight(seed=2)
    g, b_max = max_block_amax(w)
    mse = policy_scales(w, b_max, g, g, RecalibrationPolicy(keep_global_amax=True))
    act = RecalibrationPolicy(criterion="activation", keep_global_amax=True)
    assert torch.equal(policy_scales(w, b_max, g, g, act, feature_weight=torch.ones(w.shape[1])), mse)


def test_activation_criterion_ignores_features_without_input_energy():
    # One block: 15 small values and one outlier on a feature whose input is always 0.
    w = torch.linspace(-0.1, 0.1, 16).reshape(1, 16)
    w[0, 5] = 3.0
    g, b_max = max_block_amax(w)
    h = torch.ones(16)
    h[5] = 0.0
    act = RecalibrationPolicy(criterion="activation", keep_global_amax=True)
    b = policy_scales(w, b_max, g, g, act, feature_weight=h)
    # Naive argmin over the 126 codes of the error on the other 15 features.
    s2, absw = global_scale(g), w.abs()
    losses = []
    for v in fp8_code_values():
        q = e2m1_magnitude(absw / s2, v) * (v * s2)
        losses.append(float(((absw - q).square() * h).sum()))
    best = min(range(126), key=lambda k: (losses[k], k))
    assert losses[best] < losses[int(block_code_bytes(b_max.reshape(-1), s2)) - 1]
    assert int(block_code_bytes(b.reshape(-1), s2)) - 1 == best
    assert float(b) < float(b_max)  # the outlier no longer sets the scale


def test_gradient_criterion_follows_a_consistent_gradient_and_ignores_noise():
    w = weight(rows=1, cols=16, seed=3)
    g, b_max = max_block_amax(w)
    s2 = global_scale(g)
    code = int(block_code_bytes(b_max.reshape(-1), s2))  # 1..126
    q_now = fake_quantize_unchecked(w, b_max, g)
    smaller = (fp8_code_values()[code - 2] / 448) * g  # one code down
    dq = fake_quantize_unchecked(w, smaller.reshape(1, 1), g) - q_now
    pol = RecalibrationPolicy(criterion="gradient", keep_global_amax=True, min_gain=1.0, max_code_step=1)
    # The running gradient points along that move and the minibatch noise is small: switch.
    b = policy_scales(w, b_max, g, g, pol, moments=(-dq, torch.full_like(w, 1e-6)))
    assert torch.equal(b.reshape(()), smaller)
    # Same mean gradient, noise far larger than the signal: keep the scale.
    b = policy_scales(w, b_max, g, g, pol, moments=(-dq, torch.full_like(w, 1e6)))
    assert torch.equal(b, b_max)
    # No gradient at all: keep.
    assert torch.equal(policy_scales(w, b_max, g, g, pol, moments=(torch.zeros_like(w),) * 2), b_max)


def test_max_code_step_bounds_the_move():
    w = weight(seed=4)
    g, b_max = max_block_amax(w)
    s2 = global_scale(g)
    tiny = b_max / 64  # far too small: the sweep would jump back by many codes
    b = policy_scales(w, tiny, g, g, RecalibrationPolicy(keep_global_amax=True, max_code_step=2))
    moved = block_code_bytes(b.reshape(-1), s2).int() - block_code_bytes(tiny.reshape(-1), s2).int()
    assert int(moved.max()) == 2 and int(moved.min()) >= 0


# --- recalibrate() with a policy ----------------------------------------------------------------


def trained_model(steps: int = 3):
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moments = InputMoments(nvfp4_layers(model))
    for _ in range(steps):
        loss = model(torch.randn(8, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, moments


def scales(model) -> list[torch.Tensor]:
    return [t.clone() for _, m in nvfp4_layers(model) for t in (m.global_amax, m.block_amax)]


@pytest.mark.parametrize(
    ("policy", "kwargs", "match"),
    [
        ("gradient", {}, r"criterion 'gradient' needs the training optimizer"),
        ("gradient", {"optimizer": "sgd"}, r"needs Adam/AdamW state .* SGD has none"),
        ("activation", {}, r"criterion 'activation' needs input statistics"),
        ("activation", {"input_moments": "empty"}, r"no input statistics for layer '0' and 1 more"),
        ("loss_check", {}, r"loss_check needs evaluate=<callable"),
    ],
)
def test_missing_policy_inputs_are_refused_before_anything_is_written(policy, kwargs, match):
    model, _, moments = trained_model()
    if kwargs.get("optimizer") == "sgd":
        kwargs["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    if kwargs.get("input_moments") == "empty":
        moments.reset()
        kwargs["input_moments"] = moments
    before = scales(model)
    with pytest.raises(ValueError, match=match):
        recalibrate(model, policy=policy, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, scales(model), strict=True))


def test_loss_check_rolls_back_a_recalibration_that_raises_the_loss():
    model, opt, _ = trained_model()
    for _, m in nvfp4_layers(model):
        m.init_scales("max")  # stale: the sweep will change blocks
    before = scales(model)
    losses = iter([1.0, 2.0])
    report = recalibrate(model, policy="loss_check", evaluate=lambda: next(losses))
    assert report.rolled_back and (report.loss_before, report.loss_after) == (1.0, 2.0)
    assert report.rolled_back_layers == ("0", "2")
    assert report.changed_fraction == 0 and report.mse_after == report.mse_before  # what the model holds
    assert all(torch.equal(a, b) for a, b in zip(before, scales(model), strict=True))
    losses = iter([1.0, math.nan])  # NaN after: rolled back too
    assert recalibrate(model, policy="loss_check", evaluate=lambda: next(losses)).rolled_back
    losses = iter([2.0, 1.0])
    report = recalibrate(model, policy="loss_check", evaluate=lambda: next(losses))
    assert not report.rolled_back
    assert any(not torch.equal(a, b) for a, b in zip(before, scales(model), strict=True))


def test_keep_global_amax_only_grows():
    model, _, _ = trained_model()
    layer = nvfp4_layers(model)[0][1]
    g0 = layer.global_amax.clone()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    recalibrate(model, policy="mse_keep_global")
    assert torch.equal(layer.global_amax, g0)
    with torch.no_grad():
        layer.weight.mul_(4.0)
    recalibrate(model, policy="mse_keep_global")
    assert torch.equal(layer.global_amax, layer.weight.abs().amax())
    recalibrate(model, policy="mse")
    assert torch.equal(layer.global_amax, layer.weight.abs().amax())


def test_every_preset_runs_and_reports():
    model, opt, moments = trained_model()
    for name in POLICIES:
        report = recalibrate(model, policy=name, optimizer=opt, input_moments=moments, evaluate=lambda: 1.0)
        assert len(report.layers) == 2 and math.isfinite(report.mse_after), name
        for _, m in nvfp4_layers(model):
            assert torch.isfinite(m.block_amax).all() and torch.isfinite(m.global_amax), name


def test_nonfinite_optimizer_state_never_gives_nan_scales():
    model, opt, _ = trained_model()
    recalibrate(model)  # global amax = max |w| now, so only the criterion could move a scale
    for state in opt.state.values():
        state["exp_avg"].fill_(math.nan)
    before = scales(model)
    recalibrate(model, policy="gradient", optimizer=opt)
    assert all(torch.equal(a, b) for a, b in zip(before, scales(model), strict=True))  # nothing switched


# --- the statistics ----------------------------------------------------------------------------


def test_input_moments_gather_second_moments_in_training_forwards_only():
    model = quantize_model(nn.Sequential(nn.Linear(32, 16)))
    x = torch.randn(4, 5, 32)
    ref = model(x)
    with InputMoments(nvfp4_layers(model)) as moments:
        assert torch.equal(model(x), ref)  # the hooks change nothing
        model(2 * x)
        model.eval()
        model(100 * x)  # not counted
        expected = torch.cat([x, 2 * x]).reshape(-1, 32).square().mean(dim=0)
        torch.testing.assert_close(moments.get("0"), expected)
        moments.reset()
        assert moments.get("0") is None
    assert not model[0]._forward_hooks  # removed on exit


def test_adam_moments_are_bias_corrected():
    p = nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95))
    p.grad = torch.full((4,), 2.0)
    opt.step()
    m, v = adam_moments(opt, p)
    torch.testing.assert_close(m, torch.full((4,), 2.0))
    torch.testing.assert_close(v, torch.full((4,), 4.0))


def test_per_layer_loss_check_keeps_only_the_layers_that_do_not_raise_the_loss():
    model, _, _ = trained_model()
    layers = nvfp4_layers(model)
    for _, m in layers:
        m.init_scales("max")
    old = scales(model)

    # The loss rises when layer "2" (the second) takes new scales, falls for layer "0".
    def held_out():
        first_changed = not torch.equal(layers[0][1].block_amax, old[1])
        second_changed = not torch.equal(layers[1][1].block_amax, old[3])
        return 1.0 - 0.1 * first_changed + 0.5 * second_changed

    report = recalibrate(model, policy="loss_check_layer", evaluate=held_out)
    assert report.rolled_back_layers == ("2",) and not report.rolled_back
    assert report.loss_before == 1.0 and report.loss_after == pytest.approx(0.9)
    assert not torch.equal(layers[0][1].block_amax, old[1])
    assert torch.equal(layers[1][1].block_amax, old[3]) and torch.equal(layers[1][1].global_amax, old[2])
    rows = {r.name: r for r in report.layers}
    assert rows["2"].changed_fraction == 0 and rows["2"].mse_after == rows["2"].mse_before
    assert rows["0"].changed_fraction > 0
