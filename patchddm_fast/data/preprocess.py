"""Intensity normalisation and the crop/pad box that maps volumes to the network grid and back.

Defaults (see :class:`PreprocessConfig`):

* **Percentile clipping 0.5 / 99.5**, computed per volume and per modality over the brain
  voxels only (brain = nonzero in any modality; BraTS is skull-stripped, so background is
  exactly 0).  0.5/99.5 removes the few hot voxels of FLAIR/T1ce without flattening the
  tumour's bright rim; PAPER.md quotes 0.1/99.9 and 1/99 as the usual range and both are one
  flag away.  Then min-max inside the brain maps [p_lo, p_hi] to [0, 1]; background stays 0.
* **Box**: every axis is padded (centred, extra voxel after) or cropped to a multiple of
  ``multiple`` (64 for the paper's 6 downsamplings); with ``cube=True`` all axes get the
  largest such size, so BraTS 240x240x155 becomes 256^3 with the paper's 8/8, 8/8, 50/51
  padding.  The box is a small JSON-serialisable record, so predictions made on the network
  grid are mapped back *exactly* onto the original voxel grid by :meth:`CropPadBox.invert`.
  When an axis must be cropped, the crop is centred on the brain's bounding box.
* **Labels**: ``binary`` merges every nonzero label into whole tumour (0/1); ``multiclass``
  keeps the values (e.g. BraTS 0/1/2/4).

Data already normalised (the reference ``patchddm-preprocessed`` layout) skip clipping and
min-max, and are only checked to lie in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.data.nifti import shifted_affine
from patchddm_fast.data.volumes import LoadedCase

LABEL_MODES = ("binary", "multiclass")
Shape3 = Tuple[int, int, int]


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; stored in the checkpoint so prediction repeats them exactly."""

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    multiple: int = 64
    cube: bool = True
    target_shape: Optional[Shape3] = None  # overrides multiple/cube when set
    label_mode: str = "binary"

    def __post_init__(self):
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.lower_percentile}/{self.upper_percentile}"
            )
        if int(self.multiple) < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.target_shape is not None:
            ts = tuple(int(s) for s in self.target_shape)
            if len(ts) != 3 or min(ts) < 1:
                raise ValueError(f"target_shape must be three positive sizes, got {self.target_shape}")
            object.__setattr__(self, "target_shape", ts)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_shape"] = list(self.target_shape) if self.target_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "PreprocessConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; valid keys: {sorted(names)}")
        if d.get("target_shape") is not None:
            d["target_shape"] = tuple(d["target_shape"])
        return cls(**d)


def copy_overlap(src: np.ndarray, src_origin: Sequence[int], dst: np.ndarray, dst_origin: Sequence[int]) -> None:
    """Copy the part of ``src`` that overlaps ``dst`` when both are placed in one coordinate frame.

    ``*_origin`` is the frame position of voxel (0, 0, 0) of the last three axes; leading
    axes (channels) must agree.  This one primitive implements padding, cropping, their
    inverse, and reading a patch from a bounding-box crop.
    """
    s_sl, d_sl = [], []
    for so, ss, do, ds in zip(src_origin, src.shape[-3:], dst_origin, dst.shape[-3:]):
        lo, hi = max(so, do), min(so + ss, do + ds)
        if hi <= lo:
            return
        s_sl.append(slice(lo - so, hi - so))
        d_sl.append(slice(lo - do, hi - do))
    dst[(Ellipsis, *d_sl)] = src[(Ellipsis, *s_sl)]


@dataclass(frozen=True)
class CropPadBox:
    """Original grid <-> network grid: network index = original index + offset (per axis).

    A positive offset pads before the volume, a negative one crops; the rest of
    ``target_shape`` is padding after (or cropping after).
    """

    original_shape: Shape3
    target_shape: Shape3
    offset: Tuple[int, int, int]

    def apply(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Original grid (..., X, Y, Z) -> network grid (..., *target_shape)."""
        self._check(array, self.original_shape, "original")
        out = np.full(array.shape[:-3] + tuple(self.target_shape), fill, dtype=array.dtype)
        copy_overlap(array, self.offset, out, (0, 0, 0))
        return out

    def invert(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Network grid (..., *target_shape) -> original grid; cropped-away voxels get ``fill``."""
        self._check(array, self.target_shape, "target")
        out = np.full(array.shape[:-3] + tuple(self.original_shape), fill, dtype=array.dtype)
        copy_overlap(array, (0, 0, 0), out, self.offset)
        return out

    @staticmethod
    def _check(array: np.ndarray, shape: Shape3, which: str) -> None:
        if tuple(array.shape[-3:]) != tuple(shape):
            raise ValueError(f"array of shape {tuple(array.shape)} does not end with the {which} shape {tuple(shape)}")

    def network_affine(self, original_affine: np.ndarray) -> np.ndarray:
        """The network grid's voxel -> world matrix, from the original grid's."""
        return shifted_affine(original_affine, self.offset)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CropPadBox":
        return cls(*(tuple(int(x) for x in d[k]) for k in ("original_shape", "target_shape", "offset")))


def target_shape_for(shape: Sequence[int], config: PreprocessConfig) -> Shape3:
    if config.target_shape is not None:
        return tuple(config.target_shape)  # type: ignore[return-value]
    m = int(config.multiple)
    sizes = [m * math.ceil(int(n) / m) for n in shape]
    if config.cube:
        sizes = [max(sizes)] * 3
    return tuple(sizes)  # type: ignore[return-value]


def compute_box(shape: Sequence[int], config: PreprocessConfig, foreground: Optional[np.ndarray] = None) -> CropPadBox:
    """The box for a volume of ``shape``: centred padding, or a crop centred on ``foreground``'s bounding box."""
    shape = tuple(int(n) for n in shape)
    target = target_shape_for(shape, config)
    offset = []
    for axis, (n, t) in enumerate(zip(shape, target)):
        if t >= n:
            offset.append((t - n) // 2)
            continue
        centre = n / 2.0
        if foreground is not None and foreground.any():
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(foreground.any(axis=other))
            centre = (idx[0] + idx[-1] + 1) / 2.0
        start = int(min(max(round(centre - t / 2.0), 0), n - t))
        offset.append(-start)
    return CropPadBox(shape, target, tuple(offset))  # type: ignore[arg-type]


def normalise_intensities(image: np.ndarray, lower: float, upper: float, files: Sequence = ()) -> np.ndarray:
    """Per-modality percentile clipping + min-max to [0, 1] inside the brain; background 0.

    ``image`` is (C, X, Y, Z); brain = voxels nonzero in any channel.  A channel that is
    constant inside the brain cannot be normalised and raises DatasetError naming its file.
    """
    brain = np.any(image != 0, axis=0)
    out = np.zeros(image.shape, dtype=np.float32)
    if not brain.any():
        name = files[0] if files else "image"
        raise DatasetError(f"{name}: every modality is zero everywhere; no brain voxels to normalise")
    for c in range(image.shape[0]):
        values = image[c][brain].astype(np.float64)
        lo, hi = np.percentile(values, [lower, upper])
        if not hi > lo:
            name = files[c] if c < len(files) else f"channel {c}"
            raise DatasetError(f"{name}: intensity is constant ({lo:g}) inside the brain; cannot normalise")
        out[c][brain] = ((np.clip(values, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return out


def check_unit_range(image: np.ndarray, files: Sequence = (), tol: float = 1e-4) -> np.ndarray:
    """For already-normalised data: every channel must lie in [0, 1]."""
    for c in range(image.shape[0]):
        lo, hi = float(image[c].min()), float(image[c].max())
        if lo < -tol or hi > 1 + tol:
            name = files[c] if c < len(files) else f"channel {c}"
            raise DatasetError(
                f"{name}: intensities span [{lo:g}, {hi:g}] but the patchddm-preprocessed layout expects [0, 1]; "
                f"use the raw BraTS layout (remove {'patchddm_preprocessed.json'}) to normalise them"
            )
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


@dataclass
class PreprocessedCase:
    """A case on the network grid, plus what is needed to go back to the original grid."""

    case_id: str
    image: np.ndarray  # (C, *box.target_shape) float32 in [0, 1]
    label: Optional[np.ndarray]  # (*box.target_shape) uint8 (0/1 binary, raw values multiclass)
    box: CropPadBox


def prepare_image(loaded: LoadedCase, config: PreprocessConfig, already_normalised: bool = False) -> np.ndarray:
    """Normalised image on the ORIGINAL grid, (C, X, Y, Z) float32."""
    files = [str(p) for p in loaded.case.images]
    if already_normalised:
        return check_unit_range(loaded.image, files)
    return normalise_intensities(loaded.image, config.lower_percentile, config.upper_percentile, files)


def prepare_label(label: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    return (label > 0).astype(np.uint8) if config.label_mode == "binary" else label.astype(np.uint8)


def preprocess_case(loaded: LoadedCase, config: PreprocessConfig, already_normalised: bool = False) -> PreprocessedCase:
    """Normalise, merge labels and move everything onto the network grid."""
    image = prepare_image(loaded, config, already_normalised)
    foreground = np.any(image != 0, axis=0)
    label = None
    if loaded.label is not None:
        label = prepare_label(loaded.label, config)
        foreground |= label > 0
    box = compute_box(image.shape[1:], config, foreground)
    return PreprocessedCase(
        loaded.case.case_id, box.apply(image), box.apply(label) if label is not None else None, box
    )
