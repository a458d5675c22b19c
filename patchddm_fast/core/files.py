"""Files: atomic writes -- the one home for "write to a temporary file, then rename it into
place" -- and reading a user's JSON file with an error that names it.

Every file the package writes that someone may read while it is being written (checkpoints,
run configs and logs, metrics, NIfTI outputs) goes through :func:`atomic_path`: the data
go to a temporary file in the target's folder (same file system, so ``os.replace`` is an
atomic rename), are fsync'ed, then renamed over the target.  A reader sees the old file or
the new one, never half of one; an interrupted write leaves the previous file intact, and
the temporary files a killed process leaves behind (``.<name>.<random>.tmp``) are removed
by :func:`remove_stale_temp_files`.

Kernel builds (:mod:`patchddm_fast.kernels.cpu_ext`) rename a compiled library into place the
same way but let the compiler write the file.  The cache (:mod:`patchddm_fast.data.cache`)
renames a whole folder, which ``os.replace`` cannot do over an existing one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Union

from patchddm_fast.core.errors import DatasetError

PathLike = Union[str, os.PathLike]

# What atomic_path's temporary names look like (with the default suffix).
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; on a clean exit it is fsync'ed and renamed
    over ``path``, on an exception it is removed and ``path`` stays as it was.

    The temporary name is ``.<name>.<random><suffix>``; writers that pick the format from the
    file name (nibabel: ``.nii.gz``) pass a suffix ending in it.  The writer creates the file
    (so it gets the permissions a plain ``open`` gives).  An OSError without a file name
    (disk full, file-size limit) is re-raised naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp.exists():
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, f"{exc.strerror or exc} (while writing; the previous file is unchanged)",
                          str(path)) from exc
        raise


def atomic_write_bytes(path: PathLike, write_fn: Callable[[BinaryIO], object]) -> None:
    """Call ``write_fn(file_object)`` on a temporary file next to ``path``, then rename it into place.

    The file is readable by its owner only (mode 0600), as checkpoints -- which hold the
    model -- always were.
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)


def atomic_write_text(path: PathLike, text: str) -> None:
    """``text`` (UTF-8) written atomically: readers see the old file or the new one, never half."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: PathLike) -> List[Path]:
    """Delete the ``.<name>.<random>.tmp`` files that killed atomic writes left in ``folder``.

    Call it only while holding the folder's run lock (:mod:`patchddm_fast.core.runlock`): then
    no live writer can own one of them.
    """
    removed: List[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _TEMP_NAME.match(entry.name):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def read_json_object(path: PathLike, what: str, expected: str = "a JSON object") -> Dict[str, Any]:
    """The JSON object stored in a user's file ``path`` (``what`` names it in messages, e.g.
    "dataset.json"); a :class:`DatasetError` naming the file when it cannot be read or parsed,
    or holds something other than an object (``expected`` says what it should be)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read {what} ({exc})") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: {what} must be {expected}")
    return raw
