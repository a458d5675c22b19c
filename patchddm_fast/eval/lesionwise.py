"""BraTS 2023 lesion-wise Dice and HD95, the challenge's ranking metrics since 2023.

Definition (BraTS 2023 "lesion-wise performance metrics", R. Saluja et al., the official
code at github.com/rachitsaluja/BraTS-2023-Metrics, ``brats_metrics.py``; BraTS-GLI
parameters: dilation factor 3, lesion volume threshold 50 mm^3), per region (WT/TC/ET):

1. Ground-truth lesions are the 26-connected components of the region's mask.  Lesions
   whose dilations touch are one lesion: the mask is dilated ``dilation`` times with the
   18-neighbour structuring element, the dilated mask's 26-connected components group
   the ground-truth voxels.
2. Predicted lesions are the 26-connected components of the predicted mask.  A predicted
   lesion matches a ground-truth lesion when it overlaps that lesion's own dilation (same
   element, same count); one predicted lesion may match several ground-truth lesions.
3. Each ground-truth lesion is scored against the union of the whole predicted lesions
   that match it: Dice, and HD95 (374 mm when nothing matches, the official stand-in for
   an infinite distance).
4. Ground-truth lesions of volume (voxels x voxel volume) at most ``volume_threshold``
   mm^3 are left out, detected or not.  Predicted lesions that match no ground-truth
   lesion are false positives: each adds one term with Dice 0 and HD95 374.
5. Lesion-wise Dice = sum of kept lesions' Dice / (kept lesions + false positives);
   lesion-wise HD95 likewise with 374 per false positive.  With no term at all (no kept
   lesion and no false positive) the scores are Dice 1 and HD95 0, as in the official code.

One deliberate difference: HD95 of a lesion uses this project's :func:`~patchddm_fast.eval.metrics.hd95`
(MONAI / BraTS definition on face-connected surface voxels), where the official code uses
DeepMind's surface-distance package, which weights surface elements by area; the two can
differ by a fraction of a voxel on the same pair of masks.  Dice is identical.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np
from scipy import ndimage

from patchddm_fast.eval.metrics import dice, hd95

FP_HD95_MM = 374.0  # the official code's value for an undefined (infinite) HD95
GLI_DILATION = 3  # BraTS-GLI (glioma) parameters of the official code
GLI_VOLUME_THRESHOLD_MM3 = 50.0

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_DILATION_18 = ndimage.generate_binary_structure(3, 2)


@dataclass
class Lesion:
    """One ground-truth lesion (after merging by dilation) and its score."""

    index: int
    volume_mm3: float
    matched_predictions: List[int]
    dice: float
    hd95: float
    counted: bool  # False when at most the volume threshold


@dataclass
class LesionWiseResult:
    dice: float
    hd95: float
    n_tp: int  # counted ground-truth lesions with at least one matching prediction
    n_fn: int  # counted ground-truth lesions with none
    n_fp: int  # predicted lesions matching no ground-truth lesion
    lesions: List[Lesion] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=_DILATION_18, iterations=iterations)


def ground_truth_lesions(gt: np.ndarray, dilation: int = GLI_DILATION) -> np.ndarray:
    """Integer map of ground-truth lesions, 26-connected and merged where dilations touch."""
    grouped, _ = ndimage.label(_dilate(gt, dilation), structure=_CONNECTIVITY_26)
    return np.where(gt, grouped, 0)


def lesion_wise(pred, gt, spacing: Sequence[float] = (1.0, 1.0, 1.0), *, dilation: int = GLI_DILATION,
                volume_threshold: float = GLI_VOLUME_THRESHOLD_MM3) -> LesionWiseResult:
    """Lesion-wise Dice and HD95 (mm) of one region's boolean masks (see the module docstring)."""
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must be 3D masks of one shape, got {pred.shape} and {gt.shape}")
    voxel_mm3 = float(np.prod(spacing))
    pred_cc, _ = ndimage.label(pred, structure=_CONNECTIVITY_26)
    gt_cc = ground_truth_lesions(gt, dilation)
    lesions: List[Lesion] = []
    matched_any: set = set()
    for index in [int(v) for v in np.unique(gt_cc) if v != 0]:
        lesion = gt_cc == index
        matches = sorted(int(v) for v in np.unique(pred_cc[_dilate(lesion, dilation)]) if v != 0)
        matched_any.update(matches)
        pred_lesion = np.isin(pred_cc, matches) if matches else np.zeros_like(pred)
        distance = hd95(pred_lesion, lesion, spacing=spacing) if matches else np.inf
        volume = float(lesion.sum()) * voxel_mm3
        lesions.append(Lesion(index, volume, matches, dice(pred_lesion, lesion),
                              float(distance) if np.isfinite(distance) else FP_HD95_MM, volume > volume_threshold))
    n_fp = len({int(v) for v in np.unique(pred_cc) if v != 0} - matched_any)
    counted = [les for les in lesions if les.counted]
    terms = len(counted) + n_fp
    if terms == 0:
        lw_dice, lw_hd95 = 1.0, 0.0
    else:
        lw_dice = sum(les.dice for les in counted) / terms
        lw_hd95 = (sum(les.hd95 for les in counted) + FP_HD95_MM * n_fp) / terms
    n_tp = sum(1 for les in counted if les.matched_predictions)
    return LesionWiseResult(float(lw_dice), float(lw_hd95), n_tp, len(counted) - n_tp, n_fp, lesions)
