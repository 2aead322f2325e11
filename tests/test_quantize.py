"""QATConfig validation and quantize_model: selection, warnings, errors, HF models, save/load."""

import io
import warnings

import pytest
import torch
from torch import nn

from nvfp4_qat import NVFP4Linear, QATConfig, quantize_model, recalibrate
from nvfp4_qat.quantize import nvfp4_layers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 48)
        self.mlp = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.odd = nn.Linear(32, 20)  # 20 outputs: fine
        self.odd_in = nn.Linear(20, 32)  # 20 inputs: not divisible by 16, skipped
        self.lm_head = nn.Linear(32, 10)

    def forward(self, x):
        for block in self.layers:
            x = x + block.mlp(block.attn(x))
        return self.lm_head(x + self.odd_in(self.odd(x)))


def net(seed=0, dtype=torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"include": "lm_head"}, TypeError, "QATConfig.include must be a tuple or list"),
        ({"exclude": ("ok", 3)}, TypeError, "QATConfig.exclude must hold non-empty strings"),
        ({"include": ()}, ValueError, "QATConfig.include must hold at least one pattern"),
        ({"block_size": 32}, ValueError, "QATConfig.block_size must be 16"),
        ({"block_size": "16"}, TypeError, "QATConfig.block_size must be the int 16"),
        ({"gradient": "STE"}, ValueError, r"QATConfig.gradient must be one of \('ste', 'clipped_ste'\)"),
        ({"quantize_activations": 1}, TypeError, "QATConfig.quantize_activations must be a bool"),
        ({"init_calibration": "minmax"}, ValueError, "QATConfig.init_calibration must be one of"),
        ({"backend": "cuda"}, ValueError, "QATConfig.backend must be one of"),
        ({"method": "fast"}, ValueError, "QATConfig.method must be one of"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_config_refuses_bad_fields(kwargs, error, message):
    with pytest.raises(error, match=message):
        QATConfig(**kwargs)


def test_config_normalises_and_round_trips():
    cfg = QATConfig(include=["layers.*"], exclude=["lm_head"], gradient="clipped_ste")
    assert cfg.include == ("layers.*",) and cfg.exclude == ("lm_head",)
    assert QATConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(init_calibration="max").init_calibration == "max"
    with pytest.raises(ValueError, match=r"unknown QATConfig field\(s\) \['grad'\]"):
        cfg.replace(grad="ste")
    with pytest.raises(TypeError, match="expects a mapping"):
        QATConfig.from_dict(["ste"])


def test_quantize_model_selects_swaps_and_warns_once():
    model = net()
    params = {name: p for name, p in model.named_parameters()}
    with pytest.warns(UserWarning) as record:
        out = quantize_model(model, exclude=("lm_head",), init_calibration="max")
    assert out is model
    assert len(record) == 1
    assert "odd_in (in_features=20 not divisible by 16)" in str(record[0].message)
    names = [name for name, _ in nvfp4_layers(model)]
    assert names == [
        "layers.0.attn", "layers.0.mlp.0", "layers.0.mlp.2",
        "layers.1.attn", "layers.1.mlp.0", "layers.1.mlp.2", "odd",
    ]  # fmt: skip
    assert type(model.lm_head) is nn.Linear and type(model.odd_in) is nn.Linear
    for name, p in model.named_parameters():  # the very same Parameter objects
        assert p is params[name], name
    assert model.layers[1].mlp[0].config.init_calibration == "max"


def test_include_patterns_and_errors():
    model = quantize_model(net(), QATConfig(include=("layers.*.mlp.*",), init_calibration="max"))
    assert [n for n, _ in nvfp4_layers(model)] == [
        "layers.0.mlp.0",
        "layers.0.mlp.2",
        "layers.1.mlp.0",
        "layers.1.mlp.2",
    ]
    with pytest.raises(ValueError, match="model is already quantized: it holds 4 NVFP4Linear"):
        quantize_model(model)
    with pytest.raises(ValueError, match="QATConfig.include pattern 'mpl' matches no nn.Linear module name"):
        quantize_model(net(), include=("mpl",))
    # an exclude pattern that matches nothing only warns (the quickstart's "*lm_head" on any model)
    with pytest.warns(UserWarning, match="exclude pattern 'lm_haed' matches no nn.Linear module name"):
        quantized = quantize_model(net(), exclude=("lm_haed",), init_calibration="max")
    assert len(nvfp4_layers(quantized)) == len([m for m in net().modules() if type(m) is nn.Linear]) - 1
    with pytest.raises(
        ValueError, match="the model has no nn.Linear module, so there is nothing to quantize"
    ):
        quantize_model(nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="cannot be swapped in place"):
        quantize_model(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="config must be a QATConfig"):
        quantize_model(net(), {"gradient": "ste"})
    with pytest.raises(ValueError, match="unknown QATConfig field"):
        quantize_model(net(), exclud=("lm_head",))


def test_non_finite_weight_names_the_layer_and_leaves_model_untouched():
    model = net()
    with torch.no_grad():
        model.layers[1].mlp[2].weight[0, 0] = float("inf")
    model.layers[0].mlp[0].weight.data[1, :3] = float("nan")
    with pytest.raises(
        ValueError, match=r"layer 'layers.0.mlp.0': its weight \(layers.0.mlp.0.weight, shape"
    ):
        quantize_model(model, exclude=("odd_in",))
    assert not nvfp4_layers(model)
    with pytest.raises(ValueError, match=r"'layers.1.mlp.2'.* holds 0 NaN and 1 infinite value"):
        quantize_model(model, include=("layers.1.*",))
    assert not nvfp4_layers(model)


def test_shared_module_is_converted_once_under_every_name():
    model = net()
    model.layers[1].attn = model.layers[0].attn
    quantize_model(model, exclude=("odd_in",), init_calibration="max")
    assert isinstance(model.layers[0].attn, NVFP4Linear)
    assert model.layers[1].attn is model.layers[0].attn


def test_subclass_of_linear_is_listed_not_swapped():
    model = nn.Sequential(nn.Linear(16, 32))
    model.append(nn.modules.linear.NonDynamicallyQuantizableLinear(32, 16))
    with pytest.warns(UserWarning, match="NonDynamicallyQuantizableLinear is a subclass of nn.Linear"):
        quantize_model(model, init_calibration="max")
    assert type(model[1]) is nn.modules.linear.NonDynamicallyQuantizableLinear


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prepared_recalibrated_saved_loaded_is_bit_identical(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_model(net(0, dtype), exclude=("lm_head",))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # a few "training steps"
        recalibrate(model)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        fresh = quantize_model(net(1, dtype), exclude=("lm_head",))
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 32).to(dtype)
    out = model(x)
    assert out.dtype == dtype
    assert torch.equal(fresh(x), out)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_meta_model_then_materialise_and_recalibrate():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    quantize_model(model)
    assert model[0].block_amax.device.type == "meta"
    model.to_empty(device="cpu")
    reference = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    model.load_state_dict(reference.state_dict(), strict=False)  # weights only
    recalibrate(model)
    quantize_model(reference)
    x = torch.randn(4, 32)
    assert torch.equal(model(x), reference(x))


def test_hugging_face_llama_and_gpt2():
    import transformers  # in the dev extra: fail, never skip, if it is missing

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(config).eval()
    quantize_model(llama, exclude=("lm_head",))
    layers = nvfp4_layers(llama)
    assert len(layers) == 14 and all(".layers." in name for name, _ in layers)
    ids = torch.randint(0, 96, (2, 12))
    logits = llama(ids).logits
    for name, layer in layers:  # the same model with the fake-quantized weights baked in
        parent, _, child = name.rpartition(".")
        setattr(llama.get_submodule(parent), child, layer.to_linear())
    assert torch.equal(llama(ids).logits, logits)

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    quantize_model(gpt2, init_calibration="max")  # GPT-2 uses Conv1D: only the tied lm_head is an nn.Linear
    assert [name for name, _ in nvfp4_layers(gpt2)] == ["lm_head"]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tying survives
    assert gpt2(torch.randint(0, 100, (1, 8))).logits.shape == (1, 8, 100)
