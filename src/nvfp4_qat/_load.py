""":func:`load_nvfp4`: read an NVFP4 checkpoint, trusting nothing in it but tensors.

What a checkpoint is trusted with, and what not (``SECURITY.md`` says the same for users):

* Files: only regular files directly inside the checkpoint folder are read. A shard name in the
  index is a bare file name (no ``/``, no ``..``, not absolute) that, symlinks resolved, lies in
  that folder; anything else is refused before a file is opened.
* Tensors: read with ``safetensors`` (no pickle, no code). A CRC-32 per tensor, written by
  :func:`~nvfp4_qat.export_nvfp4` in each file's metadata, is checked, so a damaged payload is
  refused; checkpoints without it (ModelOpt's) are read unchecked.
* Metadata (``"nvfp4_qat"`` in each header): must be a JSON object with the types the exporter
  writes. ``dtypes`` must name fp32/fp16/bf16. ``aliases`` may only add a tensor that no file
  stores, as a copy of a stored tensor with the same last name component (``head.weight`` from
  ``emb.weight``): an alias can never replace a stored tensor.
* Scales: ``weight_scale_2`` and ``input_scale`` must be finite and >= 0, ``weight_scale`` free
  of FP8 NaN; shapes must fit the packed weight.

Every refusal is a ``ValueError`` (or ``FileNotFoundError``) naming the file and the field.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nvfp4_qat._export_files import INDEX_FILE, SINGLE_FILE, recover

__all__ = ["load_nvfp4", "tensor_crc32"]

META_KEY = "nvfp4_qat"
_SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes (row-major), as written into the export's metadata."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(data.numpy().tobytes()) if data.numel() else 0


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _inside(folder: Path, name: object, index: Path) -> Path:
    """The shard ``name`` of ``index`` as a path inside ``folder``, or a ValueError."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or Path(name).name != name
        or "\\" in name
    ):
        raise ValueError(
            f"index {index}: weight_map entry {name!r} is not a plain file name in the checkpoint "
            "folder; refusing to read outside it"
        )
    path = folder / name
    if path.resolve().parent != folder.resolve():  # a symlink out of the folder
        raise ValueError(f"index {index}: shard {name!r} resolves outside the checkpoint folder")
    return path


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            path = path / INDEX_FILE
        elif (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no NVFP4 checkpoint at {path}")
    if path.suffix == ".safetensors":
        return [path]
    if path.suffix != ".json":
        raise ValueError(
            f"path must be a checkpoint folder, a .safetensors file or an index .json, got {path}"
        )
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"index {path} is not valid JSON: {err}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"index {path}: field 'weight_map' must be a non-empty object of tensor -> file")
    files = {name: _inside(path.parent, name, path) for name in weight_map.values()}
    missing = sorted(n for n, p in files.items() if not p.is_file())
    if missing:
        raise FileNotFoundError(f"index {path} lists shards that are missing: {missing}")
    return [files[n] for n in sorted(files)]


def _metadata(handle, file: Path) -> dict:
    raw = (handle.metadata() or {}).get(META_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{file}: metadata field {META_KEY!r} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: metadata field {META_KEY!r} must be a JSON object")
    for field, value_type in (("dtypes", str), ("aliases", str), ("crc32", int)):
        value = meta.get(field, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, value_type) and not isinstance(v, bool)
            for k, v in value.items()
        ):
            raise ValueError(
                f"{file}: metadata field {META_KEY}.{field} must map names to {value_type.__name__}s"
            )
    for name, dtype in meta.get("dtypes", {}).items():
        if dtype not in _DTYPES:
            raise ValueError(
                f"{file}: metadata field {META_KEY}.dtypes[{name!r}] is {dtype!r}; expected one of {sorted(_DTYPES)}"
            )
    return meta


def _read(file: Path, tensors: dict, origin: dict, dtypes: dict, aliases: dict) -> None:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            meta = _metadata(handle, file)
            crcs = meta.get("crc32", {})
            for key in handle.keys():  # noqa: SIM118
                if key in tensors:
                    raise ValueError(f"{file}: tensor {key!r} is also stored in {origin[key]}")
                t = handle.get_tensor(key)
                if key in crcs and tensor_crc32(t) != crcs[key]:
                    raise ValueError(
                        f"{file}: tensor {key!r} is damaged (its CRC-32 does not match the metadata)"
                    )
                tensors[key], origin[key] = t, file
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    dtypes.update(meta.get("dtypes", {}))
    aliases.update({a: (s, file) for a, s in meta.get("aliases", {}).items()})


def _check_scales(name: str, keys: dict[str, str], tensors: dict, origin: dict) -> None:
    for suffix in ("weight_scale_2", "input_scale"):
        t = tensors.get(keys[suffix])
        if t is not None and (not t.is_floating_point() or not bool((torch.isfinite(t) & (t >= 0)).all())):
            raise ValueError(
                f"{origin[keys[suffix]]}: {keys[suffix]} must be finite and >= 0, got {t.tolist()}"
            )
    ws = tensors[keys["weight_scale"]]
    if ws.is_floating_point() and not bool(torch.isfinite(ws.to(torch.float32)).all()):
        raise ValueError(
            f"{origin[keys['weight_scale']]}: {keys['weight_scale']} holds NaN or Inf block scales"
        )


def load_nvfp4(path: str | os.PathLike, *, dequantize: bool = True) -> dict[str, torch.Tensor]:
    """Read an NVFP4 checkpoint (ours or ModelOpt's layout), single-file or sharded, onto the CPU.

    With ``dequantize=True`` every quantized layer's ``weight`` comes back dequantized in its original
    dtype (recorded at export; bf16 for checkpoints without our metadata) and its scale tensors are
    dropped, so the result loads with ``strict=True`` into the plain (unquantized) model::

        plain_model.load_state_dict(load_nvfp4(path))

    Tied tensors written once are restored under every name. Only files inside the checkpoint
    folder are read, and the metadata is checked (see :mod:`nvfp4_qat._load` and ``SECURITY.md``).
    If an export was killed while swapping folders, the previous checkpoint is put back first.

    Args:
        path: the checkpoint folder, one ``.safetensors`` file, or an index ``.json``.
        dequantize: False returns the stored tensors as they are (packed uint8 weights, FP8 scales).

    Returns:
        ``{name: tensor}``.

    Raises:
        FileNotFoundError: no checkpoint (or a missing shard) at ``path``.
        ValueError: a damaged or untrusted checkpoint (a bad index or metadata, a shard outside the
            folder, a CRC mismatch, an alias over a stored tensor, NaN scales) or a quantized layer
            whose tensors do not fit together; the message names the file and the field or layer.
    """
    from nvfp4_qat.export import unpack_nvfp4  # here: export imports this module

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    folder = Path(path).expanduser().absolute()
    if not folder.exists():
        recover(folder)  # an export killed mid-swap left the previous checkpoint in a hidden folder
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    dtypes: dict[str, str] = {}
    aliases: dict[str, tuple[str, Path]] = {}
    for file in _checkpoint_files(folder):
        _read(file, tensors, origin, dtypes, aliases)
    for alias, (source, file) in aliases.items():  # before dequantizing: a shared layer is one per name
        if alias in tensors or source not in tensors or alias.rpartition(".")[2] != source.rpartition(".")[2]:
            raise ValueError(
                f"{file}: metadata alias {alias!r} -> {source!r} does not fit the export layout (an alias "
                "names a tensor no file stores, as a copy of a stored tensor of the same kind)"
            )
    for alias, (source, _) in aliases.items():
        tensors[alias], origin[alias] = tensors[source], origin[source]
    if dequantize:
        layers = [k[: -len("weight_scale_2")].rstrip(".") for k in tensors if k.endswith("weight_scale_2")]
        for name in layers:
            keys = {s: _join(name, s) for s in ("weight", *_SCALE_SUFFIXES)}
            if keys["weight"] not in tensors or keys["weight_scale"] not in tensors:
                raise ValueError(f"layer {name!r} has weight_scale_2 but no weight or weight_scale")
            _check_scales(name, keys, tensors, origin)
            dtype = _DTYPES[dtypes[name]] if name in dtypes else torch.bfloat16
            try:
                w = unpack_nvfp4(
                    tensors[keys["weight"]],
                    tensors[keys["weight_scale"]],
                    tensors[keys["weight_scale_2"]],
                    dtype,
                )
            except (TypeError, ValueError) as err:
                raise ValueError(f"layer {name!r} ({origin[keys['weight']]}): {err}") from err
            for s in _SCALE_SUFFIXES:
                tensors.pop(keys[s], None)
            tensors[keys["weight"]] = w
    return tensors
