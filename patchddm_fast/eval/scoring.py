"""Scores of an ensemble segmentation: per case (Dice, HD95, lesion-wise, uncertainty) and their summary.

What ``patchddm sample`` and ``patchddm demo`` put into ``metrics.json`` (written by
:mod:`patchddm_fast.cli.showcase`).  A case is scored from its ensemble's arrays: the
thresholded mask, the ensemble mean and variance, the first member alone (the single-sample
Dice) and the ground-truth label values.  A whole-tumour case gets one set of scores; a
region case (WT/TC/ET channels) one set per region, the whole tumour's also at the top level.

HD95 of an empty prediction is infinite; JSON has no infinity, so it is stored as ``None``
(``null``) and the mean HD95 is taken over finite cases (their count is reported).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from patchddm_fast.data.regions import REGION_NAMES, region_masks, tumour_mask
from patchddm_fast.eval.lesionwise import lesion_wise
from patchddm_fast.eval.metrics import dice, hd95
from patchddm_fast.eval.uncertainty import uncertainty_metrics

# The per-case scores a summary averages, in the order they appear.
SUMMARY_KEYS = ("dice", "hd95", "dice_single_sample", "lesion_wise_dice", "lesion_wise_hd95", "auroc_var_error", "ece")


def finite_or_none(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def region_scores(pred: np.ndarray, single: np.ndarray, gt: np.ndarray, mean: np.ndarray, var: np.ndarray,
                  threshold: float) -> Dict[str, Any]:
    """One region's scores: Dice, HD95, single-sample Dice, BraTS 2023 lesion-wise Dice/HD95,
    and how well the ensemble variance predicts errors (AUROC) and the mean is calibrated (ECE)."""
    lw = lesion_wise(pred, gt)
    unc = uncertainty_metrics(mean, var, gt, threshold=threshold)
    return dict(dice=dice(pred, gt), hd95=finite_or_none(hd95(pred, gt)), dice_single_sample=dice(single, gt),
                lesion_wise_dice=lw.dice, lesion_wise_hd95=lw.hd95, lesions_tp_fn_fp=[lw.n_tp, lw.n_fn, lw.n_fp],
                tumour_voxels=int(gt.sum()), predicted_voxels=int(pred.sum()), auroc_var_error=unc["auroc_var_error"],
                ece=unc["reliability"]["ece"], error_voxels=unc["error_voxels"], reliability=unc["reliability"])


def case_scores(mask: np.ndarray, mean: np.ndarray, var: np.ndarray, first: np.ndarray, label: np.ndarray,
                threshold: float, convention: str = "brats2020", fill_holes: bool = True) -> Dict[str, Any]:
    """The scores of one case.

    ``mask``/``mean``/``var``/``first`` (the first ensemble member) are (D, H, W) for a
    whole-tumour model, scored against ``label > 0``; or (3, D, H, W) WT/TC/ET for a region
    model, scored per region against the regions of ``label``'s values in ``convention``:
    the whole tumour's scores at the top level and every region's under ``"regions"``.
    The single sample's mask is made as the ensemble's (:func:`tumour_mask`, ``fill_holes``).
    """
    single = tumour_mask(first, threshold, fill_holes)
    if mask.ndim == 4:
        gt = region_masks(label, convention)
        per_region = {name: region_scores(mask[i], single[i], gt[i], mean[i], var[i], threshold)
                      for i, name in enumerate(REGION_NAMES)}
        return dict(**per_region["WT"], regions=per_region)
    return region_scores(mask, single, label > 0, mean, var, threshold)


def summarise(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Means of Dice and finite HD95 over cases, with the count of cases whose HD95 is infinite
    (an empty prediction or ground truth).  ``dice`` and ``hd95`` are always present; a mean
    over no finite value is None (JSON null), never NaN."""
    out: Dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        vals = [r[key] for r in records if r.get(key) is not None]
        if vals or key in ("dice", "hd95"):
            out[key] = float(np.mean(vals)) if vals else None
    out["n_cases"] = len(records)
    out["n_hd95_infinite"] = sum(1 for r in records if r.get("hd95") is None)
    return out


def summarise_regions(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """:func:`summarise` per region of region-scored records (those with ``"regions"``)."""
    return {name: summarise([r["regions"][name] for r in records]) for name in REGION_NAMES}
