"""Loading one case's files into arrays, validating everything on the way.

All checks run here, once, before a case is preprocessed or cached -- so a bad file stops
``patchddm preprocess``/``train`` up front instead of crashing a training run later:

* every file exists, is NIfTI, is 3D, decodes completely (catches truncated gzip) and is finite;
* every modality and the label share the first modality's shape and affine (within
  ``affine_atol``);
* label values are integers in the layout's allowed set (BraTS {0,1,2,4}, nnU-Net from
  dataset.json) and fit in uint8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.data.layouts import Case
from patchddm_fast.data.nifti import AFFINE_ATOL, load_volume


@dataclass
class LoadedCase:
    """A case's arrays on its original voxel grid."""

    case: Case
    image: np.ndarray  # (C, X, Y, Z) float32
    label: Optional[np.ndarray]  # (X, Y, Z) uint8 raw label values, or None
    reference: nib.Nifti1Image  # first modality: the grid and header outputs are written with

    @property
    def zooms(self) -> tuple:
        return tuple(float(z) for z in self.reference.header.get_zooms()[:3])


def _check_same_grid(path: Path, img: nib.Nifti1Image, shape: tuple, ref_path: Path, ref: nib.Nifti1Image,
                     atol: float) -> None:
    if tuple(shape) != tuple(ref.shape[:3]):
        raise DatasetError(f"{path}: shape {tuple(shape)} differs from {ref_path.name} {tuple(ref.shape[:3])}")
    diff = float(np.abs(np.asarray(img.affine) - np.asarray(ref.affine)).max())
    if diff > atol:
        raise DatasetError(
            f"{path}: affine differs from {ref_path.name} (max abs difference {diff:.4g} > tolerance {atol:g});"
            f" the modalities must be co-registered on the same voxel grid"
        )


def check_label_values(label: np.ndarray, path: Path, allowed: Optional[Sequence[int]]) -> np.ndarray:
    """Integer label array as uint8, or DatasetError naming ``path`` and the offending values."""
    rounded = np.rint(label)
    off = np.abs(label - rounded)
    if off.size and float(off.max()) > 1e-3:
        bad = np.unique(label[off > 1e-3])[:5]
        raise DatasetError(f"{path}: label values must be integers, found {bad.tolist()}")
    values = np.unique(rounded).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DatasetError(f"{path}: label values must lie in 0..255, found {values.tolist()[:10]}")
    if allowed is not None:
        unexpected = sorted(set(values.tolist()) - set(int(v) for v in allowed))
        if unexpected:
            raise DatasetError(
                f"{path}: unexpected label values {unexpected} (expected a subset of {sorted(set(allowed))})"
            )
    return rounded.astype(np.uint8)


def load_case(
    case: Case,
    *,
    label_values: Optional[Sequence[int]] = None,
    load_label: bool = True,
    expect_channels: Optional[int] = None,
    affine_atol: float = AFFINE_ATOL,
) -> LoadedCase:
    """Read and validate every file of ``case``; see the module docstring for the checks."""
    if not case.images:
        raise DatasetError(f"{case.folder}: case {case.case_id} has no image files")
    if expect_channels is not None and len(case.images) != expect_channels:
        raise DatasetError(
            f"{case.folder}: case {case.case_id} has {len(case.images)} image files, expected {expect_channels}"
        )
    ref_path = case.images[0]
    first, ref = load_volume(ref_path)
    image = np.empty((len(case.images),) + first.shape, dtype=np.float32)
    image[0] = first
    del first
    for c, path in enumerate(case.images[1:], start=1):
        data, img = load_volume(path)
        _check_same_grid(path, img, data.shape, ref_path, ref, affine_atol)
        image[c] = data
    label = None
    if load_label and case.label is not None:
        data, img = load_volume(case.label)
        _check_same_grid(case.label, img, data.shape, ref_path, ref, affine_atol)
        label = check_label_values(data, case.label, label_values)
    return LoadedCase(case, image, label, ref)
