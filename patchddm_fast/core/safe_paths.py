"""Where the project may write: inside the output folder the user named, and nowhere else.

Every output path is built from a folder the user chose plus a name, and names partly
come from data (case ids from folder or file names) or from flags (``--case-id``).  So:

* :func:`check_case_id` rejects ids that could leave the folder or confuse a terminal:
  path separators, ``.``/``..``, absolute paths, control characters, empty ids;
* :func:`confined` resolves ``folder / name`` (symlinks included) and refuses a target
  outside the resolved folder;
* :func:`check_targets` refuses to touch an input file ever, and an existing output
  unless the user passed ``--overwrite`` -- both on *resolved* paths, so a folder that
  does not exist yet or a symlink cannot hide what would really be replaced;
* :func:`output_folder` turns "--out is a file" or "--out is not writable" into one
  sentence before any work is done.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence, Set, Union

from patchddm_fast.core.errors import DatasetError

PathLike = Union[str, "os.PathLike[str]"]


class UnsafePathError(DatasetError):
    """A name or path would write outside the output folder or replace what must not be replaced."""


def check_case_id(case_id: str, source: str = "case id") -> str:
    """``case_id`` if it is a plain file-name component, else UnsafePathError naming it and why."""
    if not isinstance(case_id, str) or not case_id:
        raise UnsafePathError(f"{source} {case_id!r}: must be a non-empty name")
    problems = []
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in case_id):
        problems.append("contains control characters")
    if "/" in case_id or "\\" in case_id or (os.altsep and os.altsep in case_id):
        problems.append("contains a path separator")
    if case_id in (".", "..") or case_id.startswith(".."):
        problems.append("is or starts with '..'")
    if os.path.isabs(case_id):
        problems.append("is an absolute path")
    if problems:
        raise UnsafePathError(f"{source} {case_id!r} {' and '.join(problems)}; a case id must be a plain name "
                              f"(it becomes part of output file names)")
    return case_id


def confined(folder: PathLike, name: str) -> Path:
    """``folder / name``, after checking that its resolved location lies inside the resolved ``folder``."""
    folder = Path(folder)
    target = folder / name
    base = folder.resolve()
    real = target.resolve()
    if base != real.parent and base not in real.parents:
        raise UnsafePathError(f"{target}: resolves to {real}, outside the output folder {base}; refusing to write there")
    return target


def output_folder(path: PathLike, flag: str = "--out") -> Path:
    """Create ``path`` if needed; a clear error when it is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnsafePathError(f"{path}: {flag} must be a folder, but a file of that name exists")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(13, f"{flag} folder is not writable", str(path))
    return path


def check_targets(targets: Sequence[Path], *, overwrite: bool, inputs: Iterable[PathLike] = (),
                  folder: PathLike = ".") -> None:
    """Refuse any target that is an input (always) or exists already (unless ``overwrite``).

    ``targets`` should come from :func:`confined`; comparisons use resolved paths.
    """
    protected: Set[Path] = {Path(p).resolve() for p in inputs}
    existing: List[Path] = []
    for target in targets:
        real = Path(target).resolve()
        if real in protected:
            raise UnsafePathError(f"{target}: refusing to overwrite an input file ({real})")
        if real.exists() or Path(target).is_symlink():
            existing.append(Path(target))
    if existing and not overwrite:
        raise UnsafePathError(f"{folder}: {len(existing)} output file(s) exist already (e.g. {existing[0].name}); "
                              f"pass --overwrite to replace them")
