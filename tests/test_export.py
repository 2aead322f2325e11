"""NVFP4 checkpoint export/load: the packed layout, bit-exact round trips, files, and bad input."""

import json
import math
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import nvfp4_qat
import nvfp4_qat.export as export_mod
from nvfp4_qat import export_nvfp4, fake_quantize_nvfp4, load_nvfp4
from nvfp4_qat.config import QATConfig
from nvfp4_qat.export import pack_nvfp4, parse_shard_size, unpack_nvfp4
from nvfp4_qat.format import global_scale
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.quantize import quantize_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


# --- packing: hand-computed bytes ----------------------------------------------------------------

# global_amax = 2688 gives s2 = 1, so u = |x| and block_amax = 6 gives the FP8 code e = 1.
ROW_ALL_CODES = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.25, -0.5, -1, -1.5, -2, -3, -4, -6]
# Ties to even (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), saturation (7, 100 -> 6).
ROW_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -0.75, 0.2, 0.3, -5.5, 2.6, 100, -0.0, 1e-3]


def test_pack_matches_hand_computed_bytes():
    x = torch.tensor(
        [ROW_ALL_CODES, ROW_TIES, [v * 2.0**-9 for v in ROW_ALL_CODES], [-1.0, 1.0] * 8], dtype=torch.float32
    )
    # Row 3: e = 2^-9 (smallest FP8 subnormal, byte 0x01); row 4: amax 0, everything flushes to 0.
    block_amax = torch.tensor([[6.0], [6.0], [6.0 * 2.0**-9], [0.0]])
    packed, ws, ws2 = pack_nvfp4(x, block_amax, torch.tensor(2688.0))
    # Low nibble = even element, high nibble = odd element, code = sign << 3 | E2M1 index.
    assert packed.tolist() == [
        [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE],
        [0x20, 0x42, 0x64, 0x76, 0x0A, 0xF1, 0x75, 0x00],
        [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE],
        [0x08] * 8,
    ]
    assert packed.dtype == torch.uint8 and ws.dtype == torch.float8_e4m3fn
    assert ws.view(torch.uint8).tolist() == [[0x38], [0x38], [0x01], [0x00]]  # 1.0, 1.0, 2^-9, 0
    assert ws2.shape == () and ws2.dtype == torch.float32 and ws2.item() == 1.0
    out = unpack_nvfp4(packed, ws, ws2, torch.float32)
    assert out[0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert math.copysign(1.0, out[0, 8].item()) == -1.0  # code 8 is -0, as copysign gives
    assert out[1].tolist() == [0, 1, 1, 2, 2, 4, 4, 6, -1, 0, 0.5, -6, 3, 6, 0, 0]
    assert torch.equal(out, fake_quantize_nvfp4(x, block_amax, 2688.0))


def test_unpack_every_byte():
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    nibble_value = table + [-v for v in table]
    packed = torch.arange(256, dtype=torch.uint8).reshape(32, 8)  # 32 rows of one 16-block
    out = unpack_nvfp4(packed, torch.full((32, 1), 2.0).to(torch.float8_e4m3fn), torch.tensor(0.25))
    expected = [[nibble_value[b & 15] * 0.5, nibble_value[b >> 4] * 0.5] for b in range(256)]
    assert out.dtype == torch.bfloat16
    assert out.float().reshape(256, 2).tolist() == expected


# --- packing: bit-exact round trip against fake_quantize_nvfp4 -----------------------------------


def make_case(kind: str, dtype: torch.dtype, seed: int, shape=(24, 96)):
    gen = torch.Generator().manual_seed(seed)
    cols = shape[-1]
    x = torch.randn(*shape, generator=gen)
    nb = x.numel() // 16
    if kind == "wide":  # block magnitudes over 2^-24..1: normal, subnormal and flushed FP8 codes
        x = (x.reshape(nb, 16) * torch.exp2(torch.empty(nb, 1).uniform_(-24, 0, generator=gen))).reshape(
            shape
        )
    if kind == "zero_blocks":
        x = x.reshape(nb, 16).masked_fill(torch.rand(nb, 1, generator=gen) < 0.3, 0.0).reshape(shape)
    if kind == "all_zero":
        x = torch.zeros(shape)
    x = x.to(dtype)
    amax = x.float().abs().reshape(nb, 16).amax(-1)
    if kind == "perturbed":  # scales off the max: saturating and loose blocks
        amax = amax * torch.empty(nb).uniform_(0.4, 1.6, generator=gen)
    return x, amax.reshape(*shape[:-1], cols // 16), x.float().abs().amax()


KINDS = ["max", "perturbed", "wide", "zero_blocks", "all_zero"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype, kind, seed):
    x, amax, g = make_case(kind, dtype, seed)
    packed, ws, ws2 = pack_nvfp4(x, amax, g)
    assert packed.shape == (24, 48) and ws.shape == (24, 6)
    out = unpack_nvfp4(packed, ws, ws2, dtype)
    fq = fake_quantize_nvfp4(x, amax, g)
    assert torch.equal(out, fq)
    # Bits too, except at -0.0 inputs (fp16 underflow makes some), which export as +0 by design.
    neg_zero = (x == 0) & torch.signbit(x)
    differ = int(((bits(out) != bits(fq)) & ~neg_zero).sum())
    assert differ == 0, f"{differ} of {x.numel()} elements differ"
    assert torch.equal(ws.float() * ws2, ws.float() * global_scale(g))
    if kind == "wide":
        e = ws.float()
        assert bool(((e > 0) & (e < 2.0**-6)).any()) and bool((e == 0).any())  # subnormal + flushed


def test_round_trip_3d_noncontiguous_and_negative_zero():
    x, amax, g = make_case("max", torch.float32, 3, shape=(2, 3, 64))
    xt = x.transpose(0, 1)  # non-contiguous, shape (3, 2, 64)
    at = amax.transpose(0, 1).contiguous()
    packed, ws, ws2 = pack_nvfp4(xt, at, g)
    assert torch.equal(unpack_nvfp4(packed, ws, ws2, torch.float32), fake_quantize_nvfp4(xt, at, g))
    # -0.0 is written as +0 (ModelOpt's sign rule: x < 0); the value still compares equal.
    z = torch.tensor([[-0.0] * 16])
    packed, ws, ws2 = pack_nvfp4(z, torch.tensor([[1.0]]), 1.0)
    assert packed.tolist() == [[0] * 8]
    assert torch.equal(
        unpack_nvfp4(packed, ws, ws2, torch.float32), fake_quantize_nvfp4(z, torch.ones(1, 1), 1.0)
    )


def test_pack_unpack_refuse_bad_input():
    with pytest.raises(ValueError, match="block_amax"):
        pack_nvfp4(torch.ones(2, 32), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="global_amax"):
        pack_nvfp4(torch.ones(2, 32), torch.ones(2, 2), float("nan"))
    with pytest.raises(TypeError, match="packed"):
        unpack_nvfp4(torch.ones(2, 8), torch.ones(2, 1), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weight_scale"):
        unpack_nvfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 2), torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_packing_equals_cpu(dtype):
    x, amax, g = make_case("wide", dtype, 7, shape=(64, 256))
    on_cpu = pack_nvfp4(x, amax, g)
    on_gpu = pack_nvfp4(x.cuda(), amax.cuda(), g.cuda())
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.is_cuda and torch.equal(
            a.reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)
        )
    out = unpack_nvfp4(*on_gpu, dtype=dtype)
    assert out.is_cuda and torch.equal(out.cpu(), fake_quantize_nvfp4(x, amax, g))


# --- export / load of models ---------------------------------------------------------------------


class Tiny(nn.Module):
    """Embedding, two quantizable linears, an excluded head, a LayerNorm and a plain buffer."""

    def __init__(self, dtype=torch.float32, tie=False):
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10, bias=False)
        self.register_buffer("pos", torch.arange(4.0))
        if tie:
            self.head.weight = self.emb.weight
        self.to(dtype)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.norm(h + self.down(torch.relu(self.up(h)))))


def prepared(dtype=torch.float32, tie=False, seed=0, **overrides):
    torch.manual_seed(seed)
    model = Tiny(dtype, tie)
    return quantize_model(model, QATConfig(exclude=("head",), init_calibration="max"), **overrides).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_export_layout_and_bit_exact_load(tmp_path, dtype):
    model = prepared(dtype)
    with torch.no_grad():  # scales that are not the max: the export must use them as they are
        model.up.block_amax.mul_(torch.rand_like(model.up.block_amax) + 0.5)
    out = export_nvfp4(model, tmp_path / "ckpt")
    assert out == (tmp_path / "ckpt").absolute()
    assert sorted(os.listdir(out)) == ["hf_quant_config.json", "model.safetensors"]
    raw = load_nvfp4(out, dequantize=False)
    assert sorted(raw) == sorted(
        ["emb.weight", "up.weight", "up.weight_scale", "up.weight_scale_2", "up.bias", "down.weight"]
        + ["down.weight_scale", "down.weight_scale_2", "norm.weight", "norm.bias", "head.weight", "pos"]
    )
    for name, layer in (("up", model.up), ("down", model.down)):
        assert raw[f"{name}.weight"].dtype == torch.uint8 and raw[f"{name}.weight"].shape == (
            layer.out_features,
            layer.in_features // 2,
        )
        assert raw[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert raw[f"{name}.weight_scale"].shape == (layer.out_features, layer.in_features // 16)
        assert bits(raw[f"{name}.weight_scale_2"]).item() == bits(global_scale(layer.global_amax)).item()
    for key in ("emb.weight", "head.weight", "norm.weight", "pos"):
        assert (
            torch.equal(raw[key], model.state_dict()[key]) and raw[key].dtype == model.state_dict()[key].dtype
        )
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    assert json.loads((out / "hf_quant_config.json").read_text()) == {
        "producer": {"name": "nvfp4_qat", "version": nvfp4_qat.__version__},
        "quantization": {
            "quant_algo": "W4A16_NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": ["head"],
        },
    }
    loaded = load_nvfp4(out)
    for name in ("up", "down"):
        w, fq = loaded[f"{name}.weight"], getattr(model, name).fake_quantized_weight().detach()
        assert w.dtype == dtype and torch.equal(bits(w), bits(fq))
    # A plain model (no NVFP4 layers) takes the loaded dict strictly and computes the same logits.
    plain = Tiny(dtype).eval()
    plain.load_state_dict(loaded, strict=True)
    ids = torch.tensor([[1, 2, 3, 9]])
    with torch.no_grad():
        assert torch.equal(plain(ids), model(ids))


def test_sharded_export_matches_single_file(tmp_path):
    model = prepared()
    single = load_nvfp4(export_nvfp4(model, tmp_path / "one"))
    out = export_nvfp4(model, tmp_path / "many", max_shard_size="1.5kB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(os.listdir(out)) == sorted(
        ["hf_quant_config.json", "model.safetensors.index.json", *shards]
    )
    raw = load_nvfp4(out, dequantize=False)
    assert sorted(index["weight_map"]) == sorted(raw)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in raw.values())
    for suffix in ("weight_scale", "weight_scale_2"):  # a layer's tensors share its shard
        assert index["weight_map"][f"up.{suffix}"] == index["weight_map"]["up.weight"]
    sharded = load_nvfp4(out / "model.safetensors.index.json")
    assert sorted(sharded) == sorted(single)
    assert all(torch.equal(bits(sharded[k]), bits(single[k])) for k in single if k.endswith("weight"))
    os.remove(out / shards[-1])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_nvfp4(out)


def test_w4a4_exports_input_scale(tmp_path):
    model = prepared(quantize_activations=True).train()
    with pytest.raises(ValueError, match="'up'.*input_amax"):  # no forward yet: no input scale
        export_nvfp4(model, tmp_path / "uncalibrated")
    assert not (tmp_path / "uncalibrated").exists()
    model(torch.tensor([[1, 2, 3]]))  # a training forward records the running input amax
    out = export_nvfp4(model, tmp_path / "w4a4")
    raw = load_nvfp4(out, dequantize=False)
    for name in ("up", "down"):
        amax = getattr(model, name).input_amax
        assert amax.item() > 0 and torch.equal(raw[f"{name}.input_scale"], global_scale(amax))
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    assert "up.input_scale" not in load_nvfp4(out)  # the dequantized dict is for a plain model


def test_mixed_activation_layers_and_shared_module(tmp_path):
    model = prepared()
    model.down = NVFP4Linear.from_linear(
        nn.Linear(64, 32, bias=False), QATConfig(quantize_activations=True, init_calibration="max")
    )
    model.down.input_amax.fill_(3.0)
    model.extra = model.up  # the same NVFP4 module under a second name
    out = export_nvfp4(model, tmp_path / "mixed")
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION"
    assert quant["quantized_layers"] == {
        "up": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
        "down": {"quant_algo": "NVFP4", "group_size": 16},
        "extra": {"quant_algo": "W4A16_NVFP4", "group_size": 16},
    }
    loaded = load_nvfp4(out)
    assert torch.equal(loaded["extra.weight"], model.up.fake_quantized_weight().detach())
    assert torch.equal(loaded["extra.bias"], model.up.bias.detach())


def test_tied_weights_are_written_once_and_restored(tmp_path):
    model = prepared(tie=True)
    out = export_nvfp4(model, tmp_path / "tied")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "emb.weight" in f.keys() and "head.weight" not in f.keys()
        assert json.loads(f.metadata()["nvfp4_qat"])["aliases"] == {"head.weight": "emb.weight"}
    loaded = load_nvfp4(out)
    assert loaded["head.weight"] is loaded["emb.weight"]
    plain = Tiny(tie=True).eval()
    plain.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        assert torch.equal(plain(torch.tensor([[4, 5]])), model(torch.tensor([[4, 5]])))


def test_hf_model_gets_quantization_config(tmp_path):
    import transformers  # in the dev extra: fail, never skip, if it is missing

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model(model, exclude=("lm_head",), init_calibration="max")
    out = export_nvfp4(model, tmp_path / "llama")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "modelopt" and q["quant_algo"] == "W4A16_NVFP4"
    assert q["ignore"] == ["lm_head"] and q["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert q["config_groups"]["group_0"]["weights"] == {
        "dynamic": False,
        "num_bits": 4,
        "type": "float",
        "group_size": 16,
    }
    assert config["hidden_size"] == 32
    torch.manual_seed(1)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(load_nvfp4(out), strict=True)
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


# --- bad input and atomicity -----------------------------------------------------------------------


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith("."))


def test_refuses_model_without_nvfp4_layers(tmp_path):
    with pytest.raises(ValueError, match="no NVFP4Linear"):
        export_nvfp4(nn.Sequential(nn.Linear(32, 32)), tmp_path / "x")
    with pytest.raises(TypeError, match="model"):
        export_nvfp4({"w": torch.ones(1)}, tmp_path / "x")
    with pytest.raises(TypeError, match="path"):
        export_nvfp4(prepared(), 3)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("what", ["weight", "block_amax", "global_amax"])
def test_refuses_non_finite_values_naming_the_layer(tmp_path, what):
    model = prepared()
    with torch.no_grad():
        getattr(model.down, what).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"'down'.*{what}"):
        export_nvfp4(model, tmp_path / "bad")
    assert os.listdir(tmp_path) == []


def test_refuses_meta_weights(tmp_path):
    with torch.device("meta"):
        model = Tiny()
    quantize_model(model, exclude=("head",))
    with pytest.raises(ValueError, match="meta"):
        export_nvfp4(model, tmp_path / "meta")


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_nvfp4(prepared(), target)
    assert os.listdir(target) == ["old.txt"]
    with pytest.raises(FileExistsError, match="not an NVFP4 export.*old.txt"):
        export_nvfp4(prepared(), target, overwrite=True)  # never deletes a file it did not write
    assert os.listdir(target) == ["old.txt"]
    (target / "old.txt").unlink()
    export_nvfp4(prepared(), target)
    export_nvfp4(prepared(seed=1), target, overwrite=True)  # a previous export is replaced
    assert sorted(os.listdir(target)) == ["hf_quant_config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()  # an empty folder is fine without overwrite
    export_nvfp4(prepared(), tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_nvfp4(prepared(), tmp_path / "file", overwrite=True)


def test_unwritable_path_names_it(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "ckpt"  # its parent is a file
    with pytest.raises(OSError, match=f"cannot write the NVFP4 checkpoint to {target}"):
        export_nvfp4(prepared(), target)


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, overwrite):
    target = tmp_path / "ckpt"
    if overwrite:
        export_nvfp4(prepared(seed=5), target)
        before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        safetensors.torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        export_nvfp4(prepared(), target, max_shard_size=3000, overwrite=overwrite)
    assert len(calls) == 2 and leftovers(tmp_path) == []
    if overwrite:  # the previous checkpoint is untouched
        assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    else:
        assert not target.exists()


def test_parse_shard_size():
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("500mb") == 500 * 10**6
    assert parse_shard_size(" 1.5 KB ") == 1500
    assert parse_shard_size(4096) == 4096
    for bad in ("5 parsecs", "GB", "-1GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_shard_size(bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_shard_size must be positive"):
            parse_shard_size(bad)
    for bad in (True, 1.5, None):
        with pytest.raises(TypeError, match="max_shard_size"):
            parse_shard_size(bad)


def test_load_refuses_missing_or_wrong_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NVFP4 checkpoint"):
        load_nvfp4(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_nvfp4(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="path must be"):
        load_nvfp4(tmp_path / "notes.txt")
    # A quantized layer whose scale shape does not fit its packed weight.
    safetensors.torch.save_file(
        {"l.weight": torch.zeros(2, 8, dtype=torch.uint8), "l.weight_scale": torch.zeros(2, 3), "l.weight_scale_2": torch.ones(())},
        str(tmp_path / "model.safetensors"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="layer 'l'.*weight_scale"):
        load_nvfp4(tmp_path)


@pytest.mark.gpu
def test_export_from_cuda_model(tmp_path):
    model = prepared(torch.bfloat16).cuda()
    loaded = load_nvfp4(export_nvfp4(model, tmp_path / "cuda"))
    for name in ("up", "down"):
        fq = getattr(model, name).fake_quantized_weight().detach().cpu()
        assert loaded[f"{name}.weight"].device.type == "cpu" and torch.equal(
            bits(loaded[f"{name}.weight"]), bits(fq)
        )
