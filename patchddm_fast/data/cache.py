"""A disk cache of preprocessed volumes, read back as memory-mapped ``.npy`` arrays.

Decoding a BraTS case (five gzip'ed NIfTI files) and normalising it costs about a second;
a training step must not pay that.  Each case is therefore preprocessed once and stored as

    <cache_dir>/<case_id>-<key16>/image.npy   (C, *extent) float32
                                 /label.npy   (*extent) uint8        (when the case has a label)
                                 /meta.json   box, origin, source files, config, key

where ``extent`` is the bounding box of the nonzero voxels on the network grid (everything
outside is 0 by construction).  That stores ~53 MB instead of 268 MB for a BraTS case
padded to 256^3, and reading a patch copies only its overlap with the box.

The key is a SHA-256 of the source files' absolute paths, sizes and mtimes, the
preprocessing parameters and the format version: editing a file or a parameter makes a
new entry instead of silently reusing a stale one.  Entries are written into a temporary
folder and renamed into place, so a crash never leaves a half-written entry that looks
complete, and concurrent writers of the same entry cannot corrupt each other.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.data.layouts import Case, NiftiDataset
from patchddm_fast.data.nifti import PathLike
from patchddm_fast.data.preprocess import CropPadBox, PreprocessConfig, PreprocessedCase, copy_overlap, preprocess_case
from patchddm_fast.data.volumes import load_case

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$PATCHDDM_CACHE`` or ``~/.cache/patchddm_fast/volumes``."""
    env = os.environ.get("PATCHDDM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "patchddm_fast" / "volumes"


def cache_key(case: Case, config: PreprocessConfig, *, already_normalised: bool = False,
              label_values: Optional[Sequence[int]] = None) -> str:
    files = []
    for path in case.files:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot stat file ({exc})") from exc
        files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    payload = dict(format=CACHE_FORMAT, files=files, config=config.to_dict(), already_normalised=already_normalised,
                   label_values=sorted(int(v) for v in label_values) if label_values is not None else None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedVolume:
    """One cached case: the stored bounding box of its network-grid arrays, memory-mapped."""

    case_id: str
    path: Path
    image: np.ndarray  # (C, *extent) float32, memory-mapped
    label: Optional[np.ndarray]  # (*extent) uint8, memory-mapped
    origin: Tuple[int, int, int]  # network-grid position of stored voxel (0, 0, 0)
    box: CropPadBox
    meta: Dict[str, Any]

    def __getstate__(self) -> Dict[str, Any]:
        # Pickle the location, not the data: DataLoader workers started with "spawn" would
        # otherwise receive a full copy of every memory-mapped array.
        state = dict(self.__dict__)
        state["image"] = state["label"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.image, self.label = _open_arrays(self.path, self.meta)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Network-grid shape (the padded volume)."""
        return tuple(self.box.target_shape)  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.image.shape[0])

    @property
    def affine(self) -> np.ndarray:
        """Network-grid voxel -> world matrix: the source's affine moved by the crop/pad box."""
        return self.box.network_affine(np.asarray(self.meta["affine"], dtype=np.float64))

    def read(self, origin: Sequence[int] = (0, 0, 0), size: Optional[Sequence[int]] = None
             ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(image (C, *size) float32, label (*size) uint8 or None) of the network-grid window at ``origin``.

        The default window is the whole padded volume.  Only the window's overlap with the
        stored box is read from disk; the rest is zero.
        """
        size = tuple(self.shape) if size is None else tuple(int(s) for s in size)
        origin = tuple(int(o) for o in origin)
        image = np.zeros((self.channels,) + size, dtype=np.float32)
        copy_overlap(self.image, self.origin, image, origin)
        label = None
        if self.label is not None:
            label = np.zeros(size, dtype=np.uint8)
            copy_overlap(self.label, self.origin, label, origin)
        return image, label


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80] or "case"


def _write_entry(final: Path, pre: PreprocessedCase, meta: Dict[str, Any]) -> None:
    """Write image/label/meta of the nonzero bounding box into a temp folder, then rename it to ``final``."""
    nonzero = np.any(pre.image != 0, axis=0)
    if pre.label is not None:
        nonzero |= pre.label > 0
    if nonzero.any():
        lo = [int(np.flatnonzero(nonzero.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
        hi = [int(np.flatnonzero(nonzero.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    else:
        lo, hi = [0, 0, 0], [1, 1, 1]
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", np.ascontiguousarray(pre.image[(slice(None), *window)], dtype=np.float32))
        if pre.label is not None:
            np.save(tmp / "label.npy", np.ascontiguousarray(pre.label[window], dtype=np.uint8))
        meta = dict(meta, origin=lo, box=pre.box.to_dict(), has_label=pre.label is not None)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open_arrays(path: Path, meta: Dict[str, Any]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    image = np.load(path / "image.npy", mmap_mode="r")
    label = np.load(path / "label.npy", mmap_mode="r") if meta["has_label"] else None
    return image, label


def _open_entry(path: Path) -> CachedVolume:
    meta = json.loads((path / "meta.json").read_text())
    image, label = _open_arrays(path, meta)
    return CachedVolume(meta["case_id"], path, image, label, tuple(meta["origin"]),  # type: ignore[arg-type]
                        CropPadBox.from_dict(meta["box"]), meta)


class VolumeCache:
    """Preprocess-once, memory-map-forever store of cases (see the module docstring)."""

    def __init__(self, directory: Optional[PathLike] = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def entry_path(self, case: Case, key: str) -> Path:
        return self.directory / f"{_safe_name(case.case_id)}-{key[:16]}"

    def get(self, case: Case, config: PreprocessConfig, *, already_normalised: bool = False,
            label_values: Optional[Sequence[int]] = None) -> CachedVolume:
        """The cached volume of ``case``, validating and preprocessing it first when not cached yet."""
        key = cache_key(case, config, already_normalised=already_normalised, label_values=label_values)
        path = self.entry_path(case, key)
        if (path / "meta.json").is_file():
            try:
                return _open_entry(path)
            except (OSError, ValueError, KeyError):
                shutil.rmtree(path, ignore_errors=True)  # damaged from outside: rebuild below
        loaded = load_case(case, label_values=label_values)
        pre = preprocess_case(loaded, config, already_normalised)
        meta = dict(format=CACHE_FORMAT, key=key, case_id=case.case_id, config=config.to_dict(),
                    files=[str(p) for p in case.files], zooms=list(loaded.zooms),
                    affine=np.asarray(loaded.reference.affine).tolist())
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_entry(path, pre, meta)
        return _open_entry(path)

    def build(self, dataset: NiftiDataset, config: PreprocessConfig, *, cases: Optional[Sequence[str]] = None,
              workers: int = 1, progress: bool = True) -> List[CachedVolume]:
        """Validate and cache every case of ``dataset`` (or the ids in ``cases``), in order.

        Any bad file raises DatasetError here, before training starts.  ``workers > 1``
        preprocesses cases in parallel processes.
        """
        chosen = dataset.cases if cases is None else [dataset.case(c) for c in cases]
        kw = dict(already_normalised=dataset.preprocessed, label_values=dataset.label_values)
        if workers > 1 and len(chosen) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_build_one, str(self.directory), c, config, kw) for c in chosen]
                for f in _progress(as_completed(futures), progress, len(chosen)):
                    f.result()
            return [self.get(c, config, **kw) for c in chosen]
        return [self.get(c, config, **kw) for c in _progress(chosen, progress, len(chosen))]


def _build_one(directory: str, case: Case, config: PreprocessConfig, kw: Dict[str, Any]) -> str:
    return str(VolumeCache(directory).get(case, config, **kw).path)


def _progress(items, enabled: bool, total: int):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="preprocessing", unit="case")
