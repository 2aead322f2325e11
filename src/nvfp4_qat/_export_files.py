"""The filesystem side of :func:`~nvfp4_qat.export_nvfp4`: which folder may be written or replaced,
and a crash-safe swap of the finished folder into place.

Rules (issue 13):

* ``overwrite=True`` only ever replaces a previous export of this package, recognised by its files:
  nothing but the files the exporter writes (``model.safetensors`` or its shards and index,
  ``hf_quant_config.json`` naming ``nvfp4_qat`` as producer, ``config.json``). A folder holding
  anything else is refused, as are ``""``, the current directory, its parents and the home folder.
* The export is written into a hidden sibling ``.<name>.tmp-<pid>@<host>-<random>``, every file and
  the folder are ``fsync``-ed, and only then swapped in: the old export is first renamed into a
  hidden ``.<name>.old-<pid>@<host>-<random>/old``, then the new folder takes the final name, then
  the old one is deleted.
* A process killed part way leaves these hidden folders behind. The next export to the same target
  (and :func:`~nvfp4_qat.load_nvfp4`) puts a swapped-out old copy back when the final name is
  missing, and the next export deletes the leftovers. Only folders whose writer is known to be dead
  (same host, process gone) are touched, so that a concurrent export is never disturbed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_CONFIG_FILE = "hf_quant_config.json"
PRODUCER = "nvfp4_qat"
#: Every file name the exporter writes (shards are ``model-00001-of-00003.safetensors``).
_EXPORT_NAME = re.compile(
    r"model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json"
    r"|hf_quant_config\.json|config\.json"
)


def _owner_tag() -> str:
    # pid@host: lets a later process tell a dead writer's leftovers from a live concurrent export.
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    return f"{os.getpid()}@{host}"


def _writer_is_dead(folder_name: str, kind: str, target_name: str) -> bool:
    """Whether the hidden folder ``.<target>.<kind>-<pid>@<host>-<rand>`` belongs to a dead process here."""
    prefix = f".{target_name}.{kind}-"
    if not folder_name.startswith(prefix):
        return False
    owner = folder_name[len(prefix) :].rsplit("-", 1)[0]
    pid, _, host = owner.partition("@")
    if not pid.isdigit() or host != _owner_tag().partition("@")[2]:
        return False  # another host (a shared filesystem): it cannot be checked, leave it alone
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def is_previous_export(folder: Path) -> bool:
    """Whether ``folder`` holds exactly an export of this package (and nothing else)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    names = {p.name for p in entries}
    if QUANT_CONFIG_FILE not in names or not ({SINGLE_FILE, INDEX_FILE} & names):
        return False
    for p in entries:
        if p.is_symlink() or not p.is_file() or not _EXPORT_NAME.fullmatch(p.name):
            return False
    try:
        producer = json.loads((folder / QUANT_CONFIG_FILE).read_text()).get("producer", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(producer, dict) and producer.get("name") == PRODUCER


def check_export_path(path: object, *, overwrite: bool) -> Path:
    """The absolute export target, or an error saying why ``path`` must not be written.

    A previous export that a killed swap left hidden is put back first (:func:`recover`).

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        ValueError: ``path`` is empty, the current directory, one of its parents or the home folder.
        FileExistsError: ``path`` is a file; a non-empty folder without ``overwrite``; with
            ``overwrite``, a folder that holds anything besides a previous export of this package.
        NotADirectoryError, PermissionError: the folder cannot be created or written there.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not str(os.fspath(path)).strip():
        raise ValueError("path must name the export folder, got an empty string")
    target = Path(path).expanduser().absolute()
    real = target.resolve()
    cwd = Path.cwd().resolve()
    protected = {cwd, *cwd.parents, Path.home().resolve()}
    if real in protected:
        raise ValueError(
            f"export path {str(path)!r} is {real}, the current directory, one of its parents or the "
            "home folder; export into a new subfolder (an export replaces its folder as a whole)"
        )
    recover(target)  # a killed swap's old copy first: it decides whether the folder is "empty"
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"export path {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"export path {target} is a non-empty directory; pass overwrite=True to replace it"
            )
        if not is_previous_export(target):
            shown = sorted(p.name for p in target.iterdir())
            more = f" (+{len(shown) - 5} more)" if len(shown) > 5 else ""
            raise FileExistsError(
                f"export path {target} holds files that are not an NVFP4 export of nvfp4_qat "
                f"({', '.join(shown[:5])}{more}); overwrite=True replaces only a previous export. "
                "Choose a new or empty folder"
            )
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write the NVFP4 checkpoint to {target}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the NVFP4 checkpoint to {target}: {ancestor} is not writable")
    return target


def recover(target: Path) -> None:
    """Put back an old export that a killed swap left in a hidden folder while ``target`` is missing."""
    if target.exists() or not target.parent.is_dir():
        return
    for holder in sorted(target.parent.glob(f".{glob_escape(target.name)}.old-*")):
        old = holder / "old"
        if old.is_dir() and _writer_is_dead(holder.name, "old", target.name):
            os.rename(old, target)
            shutil.rmtree(holder, ignore_errors=True)
            return


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def clean_stale(target: Path) -> list[Path]:
    """Restore a swapped-out old copy if needed, then delete the dead writers' hidden folders."""
    recover(target)
    removed = []
    for kind in ("tmp", "old"):
        for folder in target.parent.glob(f".{glob_escape(target.name)}.{kind}-*"):
            if folder.is_dir() and _writer_is_dead(folder.name, kind, target.name):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def make_tmp(target: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk (before it is renamed into place)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(tmp: Path, target: Path) -> None:
    """Move the finished folder into place; an existing target is swapped out first, then deleted.

    A kill between the two renames leaves the old export in ``.<name>.old-*/old``, which
    :func:`recover` puts back.
    """
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_owner_tag()}-", dir=target.parent))
    os.rename(target, holder / "old")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(holder / "old", target)  # put the old checkpoint back
        holder.rmdir()
        raise
    fsync_dir(target.parent)
    shutil.rmtree(holder, ignore_errors=True)
