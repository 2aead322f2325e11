"""Export a QAT model as a deployable NVFP4 checkpoint, and load one back.

The layout is the one ModelOpt 0.47's unified Hugging Face export writes for NVFP4 (and that runtimes
which load ModelOpt NVFP4 checkpoints read). For every quantized linear ``<name>``:

* ``<name>.weight``: uint8 ``[out, in/2]``, two E2M1 codes per byte, element ``2j`` in the low
  nibble and ``2j+1`` in the high one. A code is ``sign << 3 | i``, ``i`` indexing
  :data:`~nvfp4_qat.format.E2M1_VALUES`; the sign bit is set where ``x < 0`` (ModelOpt's rule, so a
  ``-0.0`` weight is written as ``+0``).
* ``<name>.weight_scale``: float8_e4m3fn ``[out, in/16]`` (row-major, not swizzled): the block code e.
* ``<name>.weight_scale_2``: fp32 scalar ``global_amax / 2688``.
* ``<name>.input_scale``: fp32 scalar ``input_amax / 2688``, only when the layer quantizes activations.

Every other ``state_dict`` tensor is written unchanged, except our calibration buffers (``block_amax``,
``global_amax``, ``input_amax``). Dequantizing is ``value(code) * (weight_scale.float() * weight_scale_2)``,
which is :func:`~nvfp4_qat.format.fake_quantize_nvfp4` bit for bit: the codes come from format.py's
rule on ``u = |x| / s2``. ModelOpt's packer divides by the block scale instead; the two pick different
codes only for the rare elements that format.py's docstring describes (at an E2M1 midpoint).

Blocks whose FP8 code rounds to 0 (``(amax / 6) / s2 <= 2^-10``) get ``weight_scale`` 0 and
dequantize to 0, as in fake-quant; ModelOpt's own exporter clamps such scales to 2^-9 instead.

Beside the tensors: ``hf_quant_config.json`` (ModelOpt's keys: ``quant_algo`` is ``"NVFP4"`` when the
layers quantize activations and ``"W4A16_NVFP4"`` for weight-only QAT, as ModelOpt 0.47 labels them
(``modelopt/torch/export/quant_utils.py``): a runtime that reads ``"NVFP4"`` quantizes activations
too and looks for each layer's ``input_scale``, which a weight-only checkpoint does not have;
``group_size`` 16; ``exclude_modules`` = the unquantized linears), ``config.json`` with a
``quantization_config`` block when the model has a Hugging Face config, and ``model.safetensors`` or
shards with ``model.safetensors.index.json``. Each safetensors header carries ``"nvfp4_qat"`` metadata
(original weight dtypes, tied-tensor aliases) that :func:`load_nvfp4` uses.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nvfp4_qat._export_files import (
    INDEX_FILE,
    QUANT_CONFIG_FILE,
    SINGLE_FILE,
    check_export_path,
    clean_stale,
    fsync_tree,
    make_tmp,
    replace,
)
from nvfp4_qat._load import load_nvfp4, tensor_crc32
from nvfp4_qat._validation import check_block_amax, check_global_amax, check_x
from nvfp4_qat._version import __version__
from nvfp4_qat.format import BLOCK_SIZE, E2M1_VALUES, block_codes, e2m1_magnitude, global_scale
from nvfp4_qat.modules import NVFP4Linear

__all__ = ["export_nvfp4", "load_nvfp4", "pack_nvfp4", "unpack_nvfp4", "parse_shard_size"]

_META_KEY = "nvfp4_qat"
_BUFFERS = ("block_amax", "global_amax", "input_amax")  # ours: never exported
_ROWS_ELEMENTS = 1 << 22  # elements per packing chunk: bounds the fp32 temporaries (~50 MiB)


# --------------------------------------------------------------------------- tensors


def pack_nvfp4(
    x: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to packed NVFP4 with static scales (the exported ``weight`` tensors).

    Args:
        x: floating tensor ``[..., n]``, ``n`` divisible by 16 (fp32, fp16 or bf16).
        block_amax: fp32 per-block amax, ``[..., n // 16]`` or flat; finite and non-negative.
        global_amax: per-tensor amax (scalar tensor or number); finite and non-negative.

    Returns:
        ``(packed, weight_scale, weight_scale_2)``: uint8 ``[..., n // 2]``, float8_e4m3fn
        ``[..., n // 16]``, fp32 0-dim; all on ``x``'s device.

    Raises:
        ValueError, TypeError: on bad input, naming the argument.
    """
    check_x(x, BLOCK_SIZE)
    g = check_global_amax(global_amax, x)
    check_block_amax(block_amax, x, BLOCK_SIZE)
    s2 = global_scale(g)
    n = x.shape[-1]
    rows = x.detach().reshape(-1, n)  # (rows, n)
    e = block_codes(block_amax.detach().reshape(rows.shape[0], n // BLOCK_SIZE), s2)  # (rows, nb)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    packed = torch.empty(rows.shape[0], n // 2, dtype=torch.uint8, device=x.device)
    step = max(1, _ROWS_ELEMENTS // n)
    for r in range(0, rows.shape[0], step):
        xf = rows[r : r + step].to(torch.float32).reshape(-1, BLOCK_SIZE)  # (blocks, 16)
        q = e2m1_magnitude(xf.abs() / s2, e[r : r + step].reshape(-1, 1))  # format.py's rule
        index = torch.searchsorted(values, q).to(torch.uint8)  # q is exactly one of the values
        codes = (index | ((xf < 0).to(torch.uint8) << 3)).reshape(-1, n)  # (chunk rows, n)
        packed[r : r + step] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    shape = tuple(x.shape[:-1])
    weight_scale = e.to(torch.float8_e4m3fn).reshape(*shape, n // BLOCK_SIZE)  # e is FP8-exact
    return packed.reshape(*shape, n // 2), weight_scale, s2


def unpack_nvfp4(
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize packed NVFP4: ``sign * value(code) * (weight_scale.float() * weight_scale_2)``.

    The product is formed in fp32 in the same order as :func:`~nvfp4_qat.format.fake_quantize_nvfp4`
    (block scale first, then times the magnitude), then cast to ``dtype``.

    Args:
        packed: uint8 ``[..., n // 2]`` (element ``2j`` in the low nibble).
        weight_scale: float8_e4m3fn (or fp32 holding FP8 values) ``[..., n // 16]``.
        weight_scale_2: fp32 scalar.
        dtype: result dtype.

    Returns:
        Tensor ``[..., n]`` of ``dtype`` on ``packed``'s device.

    Raises:
        ValueError, TypeError: on mismatched dtypes or shapes.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.dim() == 0 or (packed.shape[-1] * 2) % BLOCK_SIZE != 0:
        raise ValueError(f"packed must have a last dim divisible by 8, got shape {tuple(packed.shape)}")
    n = packed.shape[-1] * 2
    expected = (*packed.shape[:-1], n // BLOCK_SIZE)
    if tuple(weight_scale.shape) != expected:
        raise ValueError(f"weight_scale must have shape {expected}, got {tuple(weight_scale.shape)}")
    if weight_scale_2.numel() != 1:
        raise ValueError(f"weight_scale_2 must be a scalar, got shape {tuple(weight_scale_2.shape)}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(-1, BLOCK_SIZE)  # (blocks, 16)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    q = values[(codes & 0x07).long()]
    scale = weight_scale.to(torch.float32).reshape(-1, 1) * weight_scale_2.to(torch.float32).reshape(())
    out = q * scale
    # Sign by negation, like copysign in format.py: code 8 (sign, magnitude 0) gives -0.0.
    out = torch.where((codes & 0x08) != 0, -out, out)
    return out.reshape(*packed.shape[:-1], n).to(dtype)


# --------------------------------------------------------------------------- export


def parse_shard_size(max_shard_size: int | str) -> int:
    """Bytes from an int or a Hugging Face style string ("5GB" = 5e9, "2GiB" = 2 * 2**30)."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', got {max_shard_size!r}")
    if isinstance(max_shard_size, int):
        size = max_shard_size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B\s*", max_shard_size.upper())
        if match is None:
            raise ValueError(
                f"max_shard_size must look like '500MB', '5GB' or '2GiB', got {max_shard_size!r}"
            )
        base = 1024 if match.group(3) else 1000
        size = int(float(match.group(1)) * base ** " KMGT".index(match.group(2) or " "))
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return size


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _quantized_tensors(name: str, layer: NVFP4Linear) -> dict[str, torch.Tensor]:
    """The exported tensors of one layer (CPU), after checks that name the layer."""
    w = layer.weight.detach()
    if w.is_meta:
        raise ValueError(f"layer {name!r} has its weight on the meta device; materialize it before export")
    if w.dim() != 2 or w.shape[1] % BLOCK_SIZE != 0 or layer.block_amax.shape[-1] * BLOCK_SIZE != w.shape[1]:
        raise ValueError(
            f"layer {name!r}: NVFP4 export needs blocks of {BLOCK_SIZE} along in_features; weight "
            f"{tuple(w.shape)} with block_amax {tuple(layer.block_amax.shape)} does not fit"
        )
    for label, t in (("weight", w), ("block_amax", layer.block_amax), ("global_amax", layer.global_amax)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer {name!r}: {label} has NaN or Inf values; refusing to export")
    try:
        packed, weight_scale, s2 = pack_nvfp4(w, layer.block_amax.detach(), layer.global_amax.detach())
    except (TypeError, ValueError) as err:
        raise ValueError(f"layer {name!r}: {err}") from err
    out = {"weight": packed, "weight_scale": weight_scale, "weight_scale_2": s2}
    if layer.config.quantize_activations:
        amax = layer.input_amax.detach()
        if not (bool(torch.isfinite(amax).all()) and float(amax) > 0):
            raise ValueError(
                f"layer {name!r} quantizes activations but input_amax is {float(amax)}; run calibration "
                "forward passes before exporting (input_scale must be finite and > 0)"
            )
        out["input_scale"] = global_scale(amax)  # ModelOpt: input amax / (6 * 448)
    return {k: v.cpu() for k, v in out.items()}


def _export_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to write, our metadata) with quantized layers packed and aliases split off."""
    # Every name, shared modules included: each name gets its tensors (written once, as aliases).
    layers = {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, NVFP4Linear)}
    if not layers:
        raise ValueError("model has no NVFP4Linear layers; quantize it (quantize_model) before export_nvfp4")
    dropped = {_join(n, b) for n in layers for b in _BUFFERS} | {_join(n, "weight") for n in layers}
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[int, dict[str, torch.Tensor]] = {}  # id(module) -> its tensors, packed once
    for key, value in model.state_dict().items():
        prefix = _module_of(key)
        if key in dropped:
            if key == _join(prefix, "weight"):
                layer = layers[prefix]
                if id(layer) not in packed:
                    packed[id(layer)] = _quantized_tensors(prefix, layer)
                tensors.update({_join(prefix, k): t for k, t in packed[id(layer)].items()})
            continue
        if value.is_meta:
            raise ValueError(f"state_dict entry {key!r} is on the meta device; materialize it before export")
        tensors[key] = value.detach()
    # Tied parameters (e.g. embeddings and an unquantized head) share storage, which safetensors
    # refuses: write one copy and record the others as aliases that load_nvfp4 restores.
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key in list(tensors):
        t = tensors[key]
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            del tensors[key]
            continue
        seen[ident] = key
        ptr = (t.device, t.untyped_storage().data_ptr())
        # A view into storage shared with another (different) tensor must be copied on its own.
        tensors[key] = t.cpu().clone() if ptr in storages else t.cpu().contiguous()
        storages.add(ptr)
    dtypes = {n: str(m.weight.dtype).removeprefix("torch.") for n, m in layers.items()}
    return tensors, {"format_version": 1, "dtypes": dtypes, "aliases": aliases}


def _is_linear_like(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight; runtimes treat it
    # as one, so an unquantized one must be listed as excluded too.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _quant_config(model: nn.Module) -> dict:
    """``hf_quant_config.json`` with ModelOpt 0.47's keys.

    ModelOpt calls a layer with quantized activations ``NVFP4`` and a weight-only one
    ``W4A16_NVFP4`` (no ``input_scale``); mixed models get ``MIXED_PRECISION`` with per-layer entries.
    """
    algos = {
        n: "NVFP4" if m.config.quantize_activations else "W4A16_NVFP4"
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, NVFP4Linear)
    }
    quantization: dict = {"quant_algo": None, "kv_cache_quant_algo": None}
    if len(set(algos.values())) == 1:
        excluded = [
            n for n, m in model.named_modules() if _is_linear_like(m) and not isinstance(m, NVFP4Linear)
        ]
        quantization.update(quant_algo=next(iter(algos.values())), group_size=BLOCK_SIZE)
        quantization["exclude_modules"] = sorted(excluded)
    else:
        quantization["quant_algo"] = "MIXED_PRECISION"
        quantization["quantized_layers"] = {
            n: {"quant_algo": a, "group_size": BLOCK_SIZE} for n, a in algos.items()
        }

    return {"producer": {"name": "nvfp4_qat", "version": __version__}, "quantization": quantization}


def _hf_quantization_config(quant_config: dict) -> dict:
    """The ``quantization_config`` block ModelOpt puts into a Hugging Face ``config.json``."""
    q = quant_config["quantization"]
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK_SIZE}

    def group(algo: str) -> dict:
        return (
            {"input_activations": dict(weights), "weights": dict(weights)}
            if algo == "NVFP4"
            else {"weights": dict(weights)}
        )

    if q["quant_algo"] == "MIXED_PRECISION":
        by_algo: dict[str, list[str]] = {}
        for name, cfg in q["quantized_layers"].items():
            by_algo.setdefault(cfg["quant_algo"], []).append(name)
        groups = {
            f"group_{i}": {**group(a), "targets": sorted(ns)} for i, (a, ns) in enumerate(by_algo.items())
        }
        extra = {"quantized_layers": q["quantized_layers"]}
    else:
        groups, extra = {"group_0": {**group(q["quant_algo"]), "targets": ["Linear"]}}, {}
    return {
        "config_groups": groups,
        **extra,
        "ignore": q.get("exclude_modules", []),
        "quant_algo": q["quant_algo"],
        "producer": quant_config["producer"],
        "quant_method": "modelopt",
    }


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split in state_dict order; one module's tensors (a layer's weight and scales) stay together."""
    units = [list(keys) for _, keys in itertools.groupby(tensors, key=_module_of)]
    shards: list[list[str]] = [[]]
    size = 0
    for unit in units:
        nbytes = sum(tensors[k].nbytes for k in unit)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += nbytes
    return shards


def _write(
    folder: Path, model: nn.Module, tensors: dict, meta: dict, quant_config: dict, max_bytes: int
) -> None:
    shards = _shards(tensors, max_bytes)
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # A CRC-32 per tensor lets load_nvfp4 tell a damaged payload from a good one.
        shard_meta = {**meta, "crc32": {k: tensor_crc32(tensors[k]) for k in keys}}
        header = {"format": "pt", _META_KEY: json.dumps(shard_meta, sort_keys=True)}
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata=header)
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / QUANT_CONFIG_FILE).write_text(json.dumps(quant_config, indent=4) + "\n")
    hf_config = getattr(model, "config", None)
    if hasattr(hf_config, "to_json_string"):  # a Hugging Face PretrainedConfig
        config = json.loads(hf_config.to_json_string(use_diff=False))
        config["quantization_config"] = _hf_quantization_config(quant_config)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_nvfp4(
    model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "5GB", overwrite: bool = False
) -> Path:
    """Write ``model`` as an NVFP4 checkpoint in ModelOpt's Hugging Face layout (module docstring).

    Each :class:`~nvfp4_qat.modules.NVFP4Linear` is packed with its current ``block_amax`` and
    ``global_amax`` (the scales the QAT forward uses), so :func:`load_nvfp4` gives back exactly the
    fake-quantized weights. All checks run before anything touches the disk; the files are written
    into a hidden folder beside ``path``, flushed to disk and renamed into place only when complete,
    and removed on any error. Hidden folders that killed exports to the same ``path`` left behind
    are cleaned up first (:mod:`nvfp4_qat._export_files`).

    Args:
        model: a model prepared with :func:`~nvfp4_qat.quantize_model` (any device).
        path: output folder; created with its parents.
        max_shard_size: bytes per safetensors file (int, or a string like ``"5GB"``/``"2GiB"``); a
            larger model is written as shards plus ``model.safetensors.index.json``.
        overwrite: replace an existing non-empty ``path``, which must hold a previous export of this
            package and nothing else (other files are never deleted).

    Returns:
        The absolute path written.

    Raises:
        ValueError: no NVFP4 layers; NaN/Inf weights or scales (naming the layer); uncalibrated
            activation scales; a bad ``max_shard_size``; ``path`` empty, the current directory, one
            of its parents or the home folder.
        TypeError: ``model`` or ``path`` of the wrong type.
        FileExistsError: ``path`` is a file; a non-empty folder and ``overwrite`` is False; with
            ``overwrite``, a folder holding anything besides a previous export.
        OSError: ``path`` cannot be written (the message names it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    max_bytes = parse_shard_size(max_shard_size)
    target = check_export_path(path, overwrite=overwrite)
    with torch.no_grad():
        tensors, meta = _export_state(model)
    quant_config = _quant_config(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)  # hidden folders of killed exports to this target
        tmp = make_tmp(target)
    except OSError as err:
        raise type(err)(f"cannot write the NVFP4 checkpoint to {target}: {err}") from err
    try:
        _write(tmp, model, tensors, meta, quant_config, max_bytes)
        fsync_tree(tmp)  # the data is on disk before the rename makes it the checkpoint
        replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- load
