"""A table of bad inputs to every public entry, with the error each must raise (issue 13).

Each row: an id, a function that makes the bad call (building what it needs under ``tmp``), the
expected exception type and a fragment of its message (which names the argument, file or field).
Legitimate edge cases that must work (``requires_grad`` tensors) are in the last table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from nvfp4_qat import (
    NVFP4Linear,
    NVFP4Recalibration,
    QATConfig,
    export_nvfp4,
    fake_quantize_nvfp4,
    load_nvfp4,
    nvfp4_scale_sweep,
    quantize_model,
    recalibrate,
)
from nvfp4_qat.export import pack_nvfp4, unpack_nvfp4

X = torch.randn(4, 32)
BLOCK = X.abs().reshape(4, 2, 16).amax(-1)
G = X.abs().amax()


def prepared(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return quantize_model(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16)), init_calibration="max").eval()


def exported(tmp: Path, **kw) -> Path:
    return export_nvfp4(prepared(), tmp / "ckpt", **kw)


def rewrite(file: Path, edit) -> None:
    """Re-save a safetensors file with ``edit(tensors, metadata)`` applied."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = json.loads(header["__metadata__"]["nvfp4_qat"])
    tensors = safetensors.torch.load_file(str(file))
    edit(tensors, meta)
    safetensors.torch.save_file(tensors, str(file), metadata={"format": "pt", "nvfp4_qat": json.dumps(meta)})


def sharded(tmp: Path) -> Path:
    return export_nvfp4(prepared(), tmp / "ckpt", max_shard_size=600)


def index_with(tmp: Path, weight_map_edit) -> Path:
    folder = sharded(tmp)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map_edit(index["weight_map"])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def outside_shard(tmp: Path, absolute: bool) -> Path:
    # A real safetensors file outside the checkpoint that the index points at.
    (tmp / "outside").mkdir()
    safetensors.torch.save_file(
        {"0.bias": torch.full((32,), 1e6)}, str(tmp / "outside" / "model.safetensors")
    )
    name = str(tmp / "outside" / "model.safetensors") if absolute else "../outside/model.safetensors"
    return index_with(tmp, lambda wm: wm.update({"0.bias": name}))


def flip_a_payload_byte(tmp: Path) -> Path:
    folder = exported(tmp)
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes; the header stays valid
    file.write_bytes(bytes(data))
    return folder


def truncated(tmp: Path) -> Path:
    folder = exported(tmp)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    return folder


def nan_scale_2(tmp: Path) -> Path:
    folder = exported(tmp)

    def edit(t, meta):
        t["0.weight_scale_2"] = torch.tensor(float("nan"))
        meta.pop("crc32")  # a checkpoint without CRCs (e.g. edited by hand) is still checked

    rewrite(folder / "model.safetensors", edit)
    return folder


def meta_edit(tmp: Path, edit) -> Path:
    folder = exported(tmp)
    rewrite(folder / "model.safetensors", lambda t, meta: edit(meta))
    return folder


def raw_metadata(tmp: Path, value: str) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    safetensors.torch.save_file(
        {"a": torch.ones(2)}, str(folder / "model.safetensors"), metadata={"nvfp4_qat": value}
    )
    return folder


def nan_weight_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


def nan_state_dict_load() -> None:
    layer = NVFP4Linear(32, 8)
    state = layer.state_dict()
    state["global_amax"] = torch.tensor(float("nan"))
    layer.load_state_dict(state)


def chdir_and_export(tmp: Path, path: str) -> None:
    (tmp / "mine.txt").write_text("keep")
    old = os.getcwd()
    os.chdir(tmp)
    try:
        export_nvfp4(prepared(), path, overwrite=True)
    finally:
        os.chdir(old)


# (id, call(tmp), exception, message fragment)
CASES = [
    # --- fake_quantize_nvfp4 / pack / unpack: dtypes, shapes, devices, values -------------------
    (
        "fq-int-x",
        lambda t: fake_quantize_nvfp4(X.long(), BLOCK, G),
        TypeError,
        "x must have a floating dtype",
    ),
    (
        "fq-fp8-x",
        lambda t: fake_quantize_nvfp4(X.to(torch.float8_e4m3fn), BLOCK, G),
        TypeError,
        "x must have",
    ),
    (
        "fq-not-tensor",
        lambda t: fake_quantize_nvfp4([1.0] * 16, BLOCK, G),
        TypeError,
        "x must be a torch.Tensor",
    ),
    ("fq-0dim", lambda t: fake_quantize_nvfp4(torch.tensor(1.0), BLOCK, G), ValueError, "at least 1 dim"),
    ("fq-empty", lambda t: fake_quantize_nvfp4(torch.zeros(0, 16), BLOCK, G), ValueError, "non-empty"),
    (
        "fq-last-dim-15",
        lambda t: fake_quantize_nvfp4(X[:, :15], BLOCK, G),
        ValueError,
        "divisible by block_size=16",
    ),
    (
        "fq-meta-x",
        lambda t: fake_quantize_nvfp4(X.to("meta"), BLOCK, G),
        ValueError,
        "x is on the meta device",
    ),
    (
        "fq-block-shape",
        lambda t: fake_quantize_nvfp4(X, BLOCK[:, :1], G),
        ValueError,
        "block_amax must have shape",
    ),
    (
        "fq-block-int",
        lambda t: fake_quantize_nvfp4(X, BLOCK.long(), G),
        TypeError,
        "block_amax must be a floating",
    ),
    (
        "fq-block-nan",
        lambda t: fake_quantize_nvfp4(X, BLOCK * float("nan"), G),
        ValueError,
        "block_amax must be finite",
    ),
    (
        "fq-block-neg",
        lambda t: fake_quantize_nvfp4(X, -BLOCK, G),
        ValueError,
        "block_amax must be finite and >= 0",
    ),
    ("fq-block-meta", lambda t: fake_quantize_nvfp4(X, BLOCK.to("meta"), G), ValueError, "same device"),
    (
        "fq-g-nan",
        lambda t: fake_quantize_nvfp4(X, BLOCK, float("nan")),
        ValueError,
        "global_amax must be finite",
    ),
    (
        "fq-g-inf",
        lambda t: fake_quantize_nvfp4(X, BLOCK, float("inf")),
        ValueError,
        "global_amax must be finite",
    ),
    (
        "fq-g-neg",
        lambda t: fake_quantize_nvfp4(X, BLOCK, -1.0),
        ValueError,
        "global_amax must be finite and >= 0",
    ),
    (
        "fq-g-vector",
        lambda t: fake_quantize_nvfp4(X, BLOCK, BLOCK),
        ValueError,
        "global_amax must be a scalar",
    ),
    (
        "fq-g-bool",
        lambda t: fake_quantize_nvfp4(X, BLOCK, True),
        TypeError,
        "global_amax must be a scalar tensor",
    ),
    ("fq-g-meta", lambda t: fake_quantize_nvfp4(X, BLOCK, G.to("meta")), ValueError, "same device"),
    (
        "fq-block-size-0",
        lambda t: fake_quantize_nvfp4(X, BLOCK, G, 0),
        ValueError,
        "block_size must be a positive",
    ),
    (
        "pack-nan-block",
        lambda t: pack_nvfp4(X, BLOCK * float("nan"), G),
        ValueError,
        "block_amax must be finite",
    ),
    ("pack-int-x", lambda t: pack_nvfp4(X.int(), BLOCK, G), TypeError, "x must have a floating dtype"),
    ("unpack-float", lambda t: unpack_nvfp4(X, BLOCK, G), TypeError, "packed must be a uint8 tensor"),
    (
        "unpack-shape",
        lambda t: unpack_nvfp4(torch.zeros(4, 8, dtype=torch.uint8), BLOCK, G),
        ValueError,
        "weight_scale must have shape (4, 1)",
    ),  # fmt: skip
    # --- nvfp4_scale_sweep ------------------------------------------------------------------------
    ("sweep-nan-x", lambda t: nvfp4_scale_sweep(X * float("nan"), G), ValueError, "x must be finite"),
    (
        "sweep-inf-x",
        lambda t: nvfp4_scale_sweep(X.index_fill(0, torch.tensor([0]), float("inf")), G),
        ValueError,
        "x must be finite",
    ),  # fmt: skip
    ("sweep-meta-x", lambda t: nvfp4_scale_sweep(X.to("meta"), G), ValueError, "x is on the meta device"),
    ("sweep-g-zero", lambda t: nvfp4_scale_sweep(X, 0.0), ValueError, "every block would quantize to 0"),
    ("sweep-g-huge", lambda t: nvfp4_scale_sweep(X, G * 1e8), ValueError, "every block would quantize to 0"),
    (
        "sweep-backend",
        lambda t: nvfp4_scale_sweep(X, G, backend="cuda"),
        ValueError,
        "backend must be one of",
    ),
    ("sweep-method", lambda t: nvfp4_scale_sweep(X, G, method="fast"), ValueError, "method must be one of"),
    # --- modules, quantize_model, recalibrate, the callback ---------------------------------------
    (
        "linear-in-40",
        lambda t: NVFP4Linear(40, 8),
        ValueError,
        "in_features must be divisible by block_size=16",
    ),
    (
        "quantize-nan-weight",
        lambda t: quantize_model(nan_weight_model(), init_calibration="max"),
        ValueError,
        "layer '0': its weight (0.weight, shape (32, 32)) holds 1 NaN",
    ),  # fmt: skip
    ("quantize-not-module", lambda t: quantize_model({"w": X}), TypeError, "model must be an nn.Module"),
    (
        "quantize-bad-pattern",
        lambda t: quantize_model(nn.Sequential(nn.Linear(32, 32)), include=("lm_haed",)),
        ValueError,
        "pattern 'lm_haed' matches no nn.Linear",
    ),  # fmt: skip
    ("load-nan-scale", lambda t: nan_state_dict_load(), RuntimeError, "global_amax: 1 of 1 values are NaN"),
    (
        "recalibrate-no-layers",
        lambda t: recalibrate(nn.Sequential(nn.Linear(32, 32))),
        ValueError,
        "NVFP4Linear",
    ),
    (
        "callback-negative-steps",
        lambda t: NVFP4Recalibration(every_n_train_steps=-1),
        ValueError,
        "`every_n_train_steps` must be an int >= 0, got -1",
    ),  # fmt: skip
    ("callback-backend", lambda t: NVFP4Recalibration(backend="gpu"), ValueError, "`backend` must be one of"),
    ("config-gradient", lambda t: QATConfig(gradient="magic"), ValueError, "gradient"),
    # --- export_nvfp4: paths ----------------------------------------------------------------------
    ("export-empty-path", lambda t: export_nvfp4(prepared(), "", overwrite=True), ValueError, "empty string"),
    ("export-cwd", lambda t: chdir_and_export(t, "."), ValueError, "the current directory"),
    ("export-parent", lambda t: chdir_and_export(t, ".."), ValueError, "one of its parents"),
    (
        "export-user-files",
        lambda t: (
            (t / "d").mkdir()
            or (t / "d" / "a.txt").write_text("x")
            and export_nvfp4(prepared(), t / "d", overwrite=True)
        ),
        FileExistsError,
        "not an NVFP4 export",
    ),  # fmt: skip
    (
        "export-path-int",
        lambda t: export_nvfp4(prepared(), 3),
        TypeError,
        "path must be a str or os.PathLike",
    ),
    ("export-unquantized", lambda t: export_nvfp4(nn.Linear(16, 16), t / "x"), ValueError, "no NVFP4Linear"),
    (
        "export-shard-size",
        lambda t: export_nvfp4(prepared(), t / "x", max_shard_size="5 parsecs"),
        ValueError,
        "max_shard_size",
    ),  # fmt: skip
    # --- load_nvfp4: untrusted and damaged checkpoints --------------------------------------------
    (
        "load-index-dotdot",
        lambda t: load_nvfp4(outside_shard(t, absolute=False)),
        ValueError,
        "weight_map entry '../outside/model.safetensors' is not a plain file name",
    ),  # fmt: skip
    (
        "load-index-absolute",
        lambda t: load_nvfp4(outside_shard(t, absolute=True)),
        ValueError,
        "is not a plain file name",
    ),  # fmt: skip
    (
        "load-index-etc-passwd",
        lambda t: load_nvfp4(index_with(t, lambda wm: wm.update(x="../../../../../etc/passwd"))),
        ValueError,
        "refusing to read outside it",
    ),  # fmt: skip
    ("load-index-symlink-out", lambda t: load_nvfp4(symlinked_shard(t)), ValueError, "resolves outside"),
    (
        "load-index-bad-json",
        lambda t: load_nvfp4(broken_index(t, "{not json")),
        ValueError,
        "is not valid JSON",
    ),
    ("load-index-list", lambda t: load_nvfp4(broken_index(t, "[1, 2]")), ValueError, "field 'weight_map'"),
    (
        "load-index-non-str",
        lambda t: load_nvfp4(index_with(t, lambda wm: wm.update(x=3))),
        ValueError,
        "weight_map entry 3",
    ),  # fmt: skip
    (
        "load-index-missing-shard",
        lambda t: load_nvfp4(index_with(t, lambda wm: wm.update(x="gone.safetensors"))),
        FileNotFoundError,
        "missing: ['gone.safetensors']",
    ),  # fmt: skip
    (
        "load-meta-bad-json",
        lambda t: load_nvfp4(raw_metadata(t, "{oops")),
        ValueError,
        "metadata field 'nvfp4_qat' is not valid JSON",
    ),  # fmt: skip
    (
        "load-meta-not-object",
        lambda t: load_nvfp4(raw_metadata(t, "[]")),
        ValueError,
        "must be a JSON object",
    ),
    (
        "load-meta-aliases-type",
        lambda t: load_nvfp4(raw_metadata(t, '{"aliases": [1]}')),
        ValueError,
        "nvfp4_qat.aliases must map names to strs",
    ),  # fmt: skip
    (
        "load-meta-unknown-dtype",
        lambda t: load_nvfp4(meta_edit(t, lambda m: m["dtypes"].update({"0": "int8"}))),
        ValueError,
        "nvfp4_qat.dtypes['0'] is 'int8'",
    ),  # fmt: skip
    (
        "load-alias-replaces-stored",
        lambda t: load_nvfp4(meta_edit(t, lambda m: m["aliases"].update({"0.bias": "1.bias"}))),
        ValueError,
        "alias '0.bias' -> '1.bias' does not fit the export layout",
    ),  # fmt: skip
    (
        "load-alias-other-kind",
        lambda t: load_nvfp4(meta_edit(t, lambda m: m["aliases"].update({"2.bias": "0.weight"}))),
        ValueError,
        "does not fit the export layout",
    ),  # fmt: skip
    ("load-crc-mismatch", lambda t: load_nvfp4(flip_a_payload_byte(t)), ValueError, "is damaged"),
    ("load-truncated", lambda t: load_nvfp4(truncated(t)), ValueError, "is not a readable safetensors file"),
    (
        "load-not-safetensors",
        lambda t: (t / "x.safetensors").write_text("hello") and load_nvfp4(t / "x.safetensors"),
        ValueError,
        "x.safetensors is not a readable safetensors file",
    ),  # fmt: skip
    (
        "load-nan-weight-scale-2",
        lambda t: load_nvfp4(nan_scale_2(t)),
        ValueError,
        "0.weight_scale_2 must be finite and >= 0",
    ),  # fmt: skip
    ("load-path-int", lambda t: load_nvfp4(3), TypeError, "path must be a str or os.PathLike"),
    ("load-nothing", lambda t: load_nvfp4(t / "nothing"), FileNotFoundError, "no NVFP4 checkpoint"),
]


def symlinked_shard(tmp: Path) -> Path:
    folder = sharded(tmp)
    (tmp / "elsewhere.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    (folder / "model-00001-of-00002.safetensors").unlink()
    (folder / "model-00001-of-00002.safetensors").symlink_to(tmp / "elsewhere.safetensors")
    return folder


def broken_index(tmp: Path, text: str) -> Path:
    folder = sharded(tmp)
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


@pytest.mark.parametrize(("case", "call", "error", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(tmp_path, case, call, error, fragment):
    with pytest.raises(error) as info:
        call(tmp_path)
    assert fragment in str(info.value), f"{case}: {info.value}"
    if case.startswith("export-cwd") or case.startswith("export-parent"):
        assert (tmp_path / "mine.txt").read_text() == "keep"


# Legitimate edge cases: they must work, with the same result as the plain input.
def test_requires_grad_inputs_work():
    x = X.clone().requires_grad_(True)
    assert torch.equal(nvfp4_scale_sweep(x, G), nvfp4_scale_sweep(X, G))
    out = fake_quantize_nvfp4(x, BLOCK, G)
    assert torch.equal(out, fake_quantize_nvfp4(X, BLOCK, G))
    packed = pack_nvfp4(x, BLOCK, G)
    assert all(torch.equal(a, b) for a, b in zip(packed, pack_nvfp4(X, BLOCK, G), strict=True))


def test_a_good_export_still_loads_after_the_checks(tmp_path):
    model = prepared()
    loaded = load_nvfp4(export_nvfp4(model, tmp_path / "ok", max_shard_size=600))
    for name in ("0", "1"):
        layer = model[int(name)]
        assert torch.equal(loaded[f"{name}.weight"], layer.fake_quantized_weight().detach())
