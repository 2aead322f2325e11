"""Non-finite values are never hidden (issue 13, items 2 and 4).

A NaN or Inf weight or activation must give a NaN output (so the loss is NaN and the run stops or
skips the step visibly), never a finite one; scales computed from or loaded as NaN are refused; a
W4A4 layer's running input max is never poisoned by one bad batch.
"""

import math

import pytest
import torch
from torch import nn

from nvfp4_qat import NVFP4Linear, QATConfig, fake_quantize_nvfp4, quantize_model
from nvfp4_qat.modules import fake_quantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_weight_gives_nan_output_and_loss(dtype):
    torch.manual_seed(0)
    layer = NVFP4Linear.from_linear(nn.Linear(32, 8).to(dtype), QATConfig(init_calibration="max"))
    with torch.no_grad():
        layer.weight.fill_(float("nan"))  # the reproducer: an all-NaN weight, stale finite scales
    with torch.no_grad():
        out = layer(torch.randn(4, 32).to(dtype))
    assert out.isnan().all()
    assert math.isnan(float(out.float().square().mean()))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_fake_quant_of_a_non_finite_element_is_nan_and_the_rest_unchanged(value):
    torch.manual_seed(1)
    x = torch.randn(4, 32)
    block, g = x.abs().reshape(4, 2, 16).amax(-1), x.abs().amax()  # scales of the clean tensor
    before = fake_quantize_nvfp4(x, block, g)
    x[1, 3] = value
    after = fake_quantize_nvfp4(x, block, g)
    assert after.isnan().sum() == 1 and after[1, 3].isnan()
    keep = torch.isfinite(x)
    assert torch.equal(after[keep], before[keep])
    # The module's unvalidated hot path gives the same.
    assert torch.equal(fake_quantize(x, block, g, "reference").isnan(), ~keep)


def test_quantize_model_refuses_a_nan_weight_naming_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    for mode in ("max", "mse"):
        with pytest.raises(
            ValueError, match=r"layer '2': its weight \(2\.weight, shape \(16, 32\)\) holds 1 NaN"
        ):
            quantize_model(model, QATConfig(init_calibration=mode))
        assert type(model[0]) is nn.Linear  # nothing swapped


@pytest.mark.parametrize("buffer", ["block_amax", "global_amax", "input_amax"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0], ids=str)
def test_load_state_dict_refuses_bad_scales(buffer, value):
    layer = NVFP4Linear.from_linear(nn.Linear(32, 8))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state[buffer].view(-1)[0] = value
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"{buffer}: 1 of \d+ values are NaN, Inf or negative"):
        layer.load_state_dict(state)
    assert all(torch.equal(layer.state_dict()[k], before[k]) for k in before)  # nothing loaded
    with pytest.raises(RuntimeError, match=buffer):
        nn.Sequential(layer).load_state_dict({f"0.{k}": v for k, v in state.items()}, strict=False)


# --- W4A4: the running input max (item 4) -------------------------------------------------------


def w4a4_layer():
    torch.manual_seed(0)
    return NVFP4Linear.from_linear(nn.Linear(32, 8), QATConfig(quantize_activations=True)).train()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_a_non_finite_activation_is_not_folded_into_input_amax(value):
    layer = w4a4_layer()
    x = torch.randn(4, 32)
    layer(x)
    amax = layer.input_amax.clone()
    assert float(amax) == float(x.abs().amax())
    bad = x.clone()
    bad[1, 2] = value
    out = layer(bad)
    assert torch.equal(layer.input_amax, amax) and int(layer.nonfinite_input_batches) == 1
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()  # only the bad row's output
    # Later batches are quantized as before the bad one: nothing was poisoned.
    clean = layer(x)
    with torch.no_grad():
        reference = w4a4_layer()
        reference(x)
        assert torch.equal(clean, reference(x))


def test_reset_input_amax_recovers_from_an_outlier():
    layer = w4a4_layer()
    x = torch.randn(4, 32)
    outlier = x.clone()
    outlier[0, 0] = 1e30  # finite: a running max keeps it, every later input quantizes to 0
    layer(outlier)
    assert layer.input_amax == torch.tensor(1e30)
    assert torch.equal(layer(x), layer.bias.expand(4, 8))  # exactly the bias, as issue 13 found
    layer.reset_input_amax()
    assert float(layer.input_amax) == 0.0 and int(layer.nonfinite_input_batches) == 0
    assert torch.equal(layer(x), w4a4_layer()(x))
    assert "nonfinite_input_batches" not in layer.state_dict()
