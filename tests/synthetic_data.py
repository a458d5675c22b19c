"""Write BraTS-like phantom datasets to disk in any supported layout.

Real brain data cannot be shipped or downloaded in tests, so the NIfTI pipeline is
exercised on phantoms (:mod:`patchddm_fast.data.phantom`) saved the way real datasets are:
int16 "scanner" intensities (each modality with its own scale, zero outside the head),
uint8 BraTS labels, and deliberately awkward geometry -- anisotropic voxels and an oblique
sform -- so any code that drops the header or confuses axes fails loudly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import nibabel as nib
import numpy as np

from patchddm_fast.data.layouts import MODALITIES

_BRATS2023_SUFFIXES = ("t1n", "t1c", "t2w", "t2f")
_RAW_SCALE = (900.0, 1400.0, 2100.0, 700.0)  # per-modality scanner units
# nnU-Net file order (MSD BraTS puts FLAIR first): exercises the reordering to t1, t1ce, t2, flair.
NNUNET_ORDER = ("flair", "t1", "t1ce", "t2")
_NNUNET_NAMES = {"t1": "T1w", "t1ce": "t1gd", "t2": "T2w", "flair": "FLAIR"}


def oblique_affine(zooms: Sequence[float] = (1.0, 1.0, 1.5), angle_deg: float = 12.0,
                   origin: Sequence[float] = (-91.0, 126.0, -72.0)) -> np.ndarray:
    """A voxel-to-mm affine with anisotropic zooms and a rotation about two axes (oblique)."""
    a, b = np.deg2rad(angle_deg), np.deg2rad(angle_deg / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def save_volume(data: np.ndarray, affine: np.ndarray, path: Path, qform_code: int = 1, sform_code: int = 1) -> Path:
    """Save with explicit qform/sform codes and mm/s units (as scanners' converters do)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def raw_intensities(image01: np.ndarray) -> np.ndarray:
    """[0, 1] phantom channels -> int16 'scanner' intensities, one scale per modality."""
    scale = np.asarray(_RAW_SCALE[: image01.shape[0]], dtype=np.float32).reshape(-1, 1, 1, 1)
    return np.rint(image01 * scale).astype(np.int16)


def write_case(root: Path, case_id: str, image01: np.ndarray, labels: Optional[np.ndarray], affine: np.ndarray,
               layout: str = "brats2020", number: int = 1) -> List[Path]:
    """Write one case (image (4, X, Y, Z) in [0, 1], BraTS labels) in ``layout``; returns the files."""
    root = Path(root)
    files = []
    if layout in ("brats2020", "brats2023"):
        sep, names = ("_", MODALITIES) if layout == "brats2020" else ("-", _BRATS2023_SUFFIXES)
        raw = raw_intensities(image01)
        for c, m in enumerate(names):
            files.append(save_volume(raw[c], affine, root / case_id / f"{case_id}{sep}{m}.nii.gz"))
        if labels is not None:
            lab = labels.astype(np.uint8)
            if layout == "brats2023":
                lab = np.where(lab == 4, 3, lab).astype(np.uint8)
            files.append(save_volume(lab, affine, root / case_id / f"{case_id}{sep}seg.nii.gz"))
    elif layout == "nnunet":
        raw = raw_intensities(image01)
        for i, m in enumerate(NNUNET_ORDER):
            files.append(save_volume(raw[MODALITIES.index(m)], affine, root / "imagesTr" / f"{case_id}_{i:04d}.nii.gz"))
        if labels is not None:
            files.append(save_volume(labels.astype(np.uint8), affine, root / "labelsTr" / f"{case_id}.nii.gz"))
    elif layout == "patchddm-preprocessed":
        folder = root / f"{number:06d}"
        stem = f"brats_train_{number:03d}"
        for c, m in enumerate(MODALITIES):
            files.append(save_volume(image01[c].astype(np.float32), affine, folder / f"{stem}_{m}_000_w.nii.gz"))
        if labels is not None:
            files.append(save_volume(labels.astype(np.uint8), affine, folder / f"{stem}_seg_000_w.nii.gz"))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return files


def write_nnunet_json(root: Path, n_training: int) -> Path:
    """A v2 dataset.json listing the channels in FLAIR-first order (like MSD BraTS) to exercise reordering."""
    meta = {"channel_names": {str(i): _NNUNET_NAMES[m] for i, m in enumerate(NNUNET_ORDER)},
            "labels": {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 4},
            "numTraining": n_training, "file_ending": ".nii.gz"}
    path = Path(root) / "dataset.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def write_phantom_dataset(root, n: int, shape: Sequence[int], *, layout: str = "brats2020", seed: int = 0,
                          affine: Optional[np.ndarray] = None, prefix: str = "BraTS20_Training") -> List[str]:
    """Write ``n`` phantom cases of ``shape`` in ``layout`` under ``root``; returns the case ids."""
    from patchddm_fast.data.phantom import make_phantom

    root = Path(root)
    affine = oblique_affine() if affine is None else affine
    ids = []
    for i in range(1, n + 1):
        ph = make_phantom(tuple(shape), seed + i)
        cid = {"brats2023": f"BraTS-GLI-{i:05d}-000", "patchddm-preprocessed": f"{i:06d}"}.get(layout,
                                                                                            f"{prefix}_{i:03d}")
        write_case(root, cid, ph.image, ph.labels, affine, layout=layout, number=i)
        ids.append(cid)
    if layout == "nnunet":
        write_nnunet_json(root, n)
    return ids


__all__ = ["NNUNET_ORDER", "oblique_affine", "raw_intensities", "save_volume", "write_case", "write_nnunet_json",
           "write_phantom_dataset"]
