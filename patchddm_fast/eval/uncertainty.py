"""Does the ensemble's uncertainty mean something?  Error detection and calibration.

Two questions about an ensemble (mean = foreground probability, variance = uncertainty):

* **Error detection** -- :func:`auroc`: how well voxel variance ranks the voxels where the
  thresholded mean is wrong (``prediction != ground truth``) above those where it is right.
  AUROC is the Mann-Whitney statistic, computed in closed form from ranks (ties get their
  average rank, so a tie counts one half): ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``,
  where ``R_pos`` is the rank sum of the positives.  0.5 = chance, 1 = variance is higher on
  every error than on every correct voxel.  Undefined (None) without both classes.
* **Calibration** -- :func:`reliability`: the ensemble mean, clipped to [0, 1], binned into
  equal-width bins; per bin the mean predicted probability and the observed foreground
  frequency; ECE = sum over bins of (bin count / N) * |frequency - mean probability|.
  Background voxels dominate a brain volume, so ECE is small even for a poor model; the
  per-bin table (written to metrics.json and drawn by :func:`patchddm_fast.eval.figures.uncertainty_figure`)
  shows the foreground end.

numpy only, like :mod:`patchddm_fast.eval.metrics`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

DEFAULT_BINS = 10


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (flattened), ties sharing their average rank."""
    v = np.asarray(values, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of each distinct value's last member
    return ((ends - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def auroc(scores, labels) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (rank closed form); None
    when labels are all one class.  Scores must be finite."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same size, got {s.size} and {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def reliability(prob, gt, bins: int = DEFAULT_BINS) -> Dict[str, Any]:
    """Binned calibration of foreground probabilities ``prob`` (clipped to [0, 1]) against
    the boolean ``gt``: per bin [lo, hi) (the last bin includes 1) the voxel count, mean
    probability and observed frequency (None in empty bins), and the ECE."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = np.clip(np.asarray(prob, dtype=np.float64).ravel(), 0.0, 1.0)
    g = np.asarray(gt).ravel().astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"prob and gt must have the same size, got {p.size} and {g.size}")
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    psum = np.bincount(idx, weights=p, minlength=bins)
    gsum = np.bincount(idx, weights=g.astype(np.float64), minlength=bins)
    table, ece = [], 0.0
    for b in range(bins):
        n = int(count[b])
        conf = float(psum[b] / n) if n else None
        freq = float(gsum[b] / n) if n else None
        if n:
            ece += n / p.size * abs(freq - conf)
        table.append(dict(lo=b / bins, hi=(b + 1) / bins, count=n, mean_prob=conf, frequency=freq))
    return dict(bins=table, ece=float(ece) if p.size else None, n_voxels=int(p.size))


def uncertainty_metrics(mean, var, gt, threshold: float = 0.5, bins: int = DEFAULT_BINS,
                        pred=None) -> Dict[str, Any]:
    """Per case: AUROC of ``var`` for errors of the prediction (``pred`` when given, e.g. a
    mask file, else ``mean > threshold``), error count, and the reliability table / ECE of
    ``mean`` (see the module docstring)."""
    mean = np.asarray(mean, dtype=np.float64)
    gt = np.asarray(gt).astype(bool)
    if mean.shape != gt.shape or np.shape(var) != gt.shape:
        raise ValueError(f"mean {mean.shape}, var {np.shape(var)} and gt {gt.shape} must have one shape")
    prediction = mean > threshold if pred is None else np.asarray(pred).astype(bool)
    errors = prediction != gt
    return dict(auroc_var_error=auroc(var, errors), error_voxels=int(errors.sum()),
                reliability=reliability(mean, gt, bins))


def summarise_uncertainty(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean AUROC over the cases where it is defined, mean per-case ECE and the pooled ECE."""
    aurocs = [r["auroc_var_error"] for r in records if r.get("auroc_var_error") is not None]
    eces = [r["reliability"]["ece"] for r in records if r["reliability"]["ece"] is not None]
    return dict(auroc_var_error=float(np.mean(aurocs)) if aurocs else None, n_auroc_defined=len(aurocs),
                ece=float(np.mean(eces)) if eces else None,
                ece_pooled=pooled_reliability([r["reliability"] for r in records])["ece"] if records else None,
                n_cases=len(records))


def pooled_reliability(tables: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One reliability table over several cases' tables (same bins), weighting by voxel count."""
    if not tables:
        raise ValueError("no reliability tables to pool")
    bins = len(tables[0]["bins"])
    out, total, ece = [], sum(t["n_voxels"] for t in tables), 0.0
    for b in range(bins):
        n = sum(t["bins"][b]["count"] for t in tables)
        conf = sum(t["bins"][b]["count"] * (t["bins"][b]["mean_prob"] or 0.0) for t in tables) / n if n else None
        freq = sum(t["bins"][b]["count"] * (t["bins"][b]["frequency"] or 0.0) for t in tables) / n if n else None
        if n:
            ece += n / total * abs(freq - conf)
        out.append(dict(lo=tables[0]["bins"][b]["lo"], hi=tables[0]["bins"][b]["hi"], count=n, mean_prob=conf,
                        frequency=freq))
    return dict(bins=out, ece=ece, n_voxels=total)
