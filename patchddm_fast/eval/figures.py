"""PNG figures: one per case (three orthogonal slices through the tumour) and a metrics summary.

Rendering uses matplotlib's Agg canvas directly (no ``pyplot``, no global backend switch),
so it works on headless servers and does not disturb an interactive session.

Case figure: rows = axial / coronal / sagittal slices through the tumour's centre of mass
(ground truth if given and non-empty, else the predicted mask, else the probability
mass, else the volume centre); columns = FLAIR, FLAIR + ground truth (without ground
truth: another modality such as T1ce, or no such column), FLAIR + prediction
(probability colour map, threshold contour), ensemble variance.  Voxel spacing sets the
aspect ratio, so anisotropic scans are not distorted.  Slices are shown with the first
voxel axis horizontal and the later one vertical, origin at the bottom (radiological
viewers may flip the horizontal axis).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from patchddm_fast.eval.uncertainty import pooled_reliability

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _np(x) -> Optional[np.ndarray]:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _figure(width: float, height: float):
    # matplotlib takes about a second to import; only runs that draw pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, title: str = "") -> Path:
    """Title, tight layout and a PNG at ``path`` (its folder created): every figure ends here."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def tumour_centre(gt: Optional[np.ndarray], prob: np.ndarray, threshold: float = 0.5) -> Tuple[int, int, int]:
    """Voxel index of the centre of mass used to place the slices (see module docstring)."""
    for weights in (gt if gt is not None and gt.any() else None,
                    prob > threshold if (prob > threshold).any() else None,
                    np.clip(prob, 0, None) if np.clip(prob, 0, None).sum() > 0 else None):
        if weights is not None:
            w = weights.astype(np.float64)
            total = w.sum()
            return tuple(int(round(float((w.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(n)).sum()
                                         / total))) for a, n in enumerate(w.shape))  # type: ignore[return-value]
    return tuple(n // 2 for n in prob.shape)  # type: ignore[return-value]


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis).T  # remaining axes (a, b) -> rows b, columns a


def _aspect(spacing: Sequence[float], axis: int) -> float:
    a, b = [i for i in range(3) if i != axis]
    return float(spacing[b]) / float(spacing[a])


def figure_columns(has_gt: bool, second_name: Optional[str] = None, threshold: float = 0.5) -> List[str]:
    """Column titles of :func:`case_figure`.  Without ground truth the second column shows
    another modality (``second_name``, e.g. T1ce, where the enhancing rim is brightest)
    instead of an empty panel, or is dropped when there is none."""
    second = ["ground truth"] if has_gt else ([f"{second_name} (no ground truth)"] if second_name else [])
    return ["FLAIR", *second, f"prediction (mean, contour {threshold:g})", "variance"]


def _window(img: np.ndarray) -> Tuple[float, float]:
    lo, hi = (np.percentile(img[img != 0], [0.5, 99.5]) if (img != 0).any() else (0.0, 1.0))
    return float(lo), float(hi if hi > lo else lo + 1)


def case_figure(flair, gt, prob, var, path, title: str = "", *, spacing: Optional[Sequence[float]] = None,
                threshold: float = 0.5, second=None, second_name: str = "T1ce") -> Path:
    """Write the per-case PNG (see module docstring).  ``gt`` may be None (prediction only):
    then the second column shows ``second`` (another modality, titled ``second_name``) or,
    when that is None too, the figure has three columns.

    All volumes are 3D arrays (numpy or torch) on the same grid; ``prob`` is the ensemble
    mean in [0, 1], ``var`` the ensemble variance.
    """
    flair, gt, prob, var, second = _np(flair), _np(gt), _np(prob), _np(var), _np(second)
    if gt is not None:
        second = None
    shape = prob.shape
    for name, arr in (("flair", flair), ("gt", gt), ("var", var), ("second", second)):
        if arr is not None and arr.shape != shape:
            raise ValueError(f"case_figure: {name} has shape {arr.shape}, prob has {shape}")
    gt_mask = gt > 0 if gt is not None else None
    spacing = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
    centre = tumour_centre(gt_mask, prob, threshold)
    lo, hi = _window(flair)
    vmax_var = max(float(var.max()), 1e-6)
    columns = figure_columns(gt is not None, second_name if second is not None else None, threshold)
    kinds = ["flair", *(["gt"] if gt is not None else ["second"] if second is not None else []), "prob", "var"]
    n = len(columns)
    fig = _figure(13 * n / 4, 9.6)
    axes = fig.subplots(3, n)
    for row, (view, axis) in enumerate(VIEWS):
        k = centre[axis]
        img = _slice(flair, axis, k)
        asp = _aspect(spacing, axis)
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if kind == "second":
                slo, shi = _window(second)
                ax.imshow(_slice(second, axis, k), cmap="gray", vmin=slo, vmax=shi, origin="lower", aspect=asp,
                          interpolation="nearest")
            elif kind != "var":
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=asp, interpolation="nearest")
            if kind == "gt":
                g = _slice(gt_mask, axis, k)
                ax.imshow(np.ma.masked_where(~g, g.astype(float)), cmap="autumn", alpha=0.45, origin="lower",
                          aspect=asp, interpolation="nearest", vmin=0, vmax=1)
                if g.any() and not g.all():
                    ax.contour(g.astype(float), levels=[0.5], colors="red", linewidths=0.8, origin="lower")
            elif kind == "prob":
                p = _slice(prob, axis, k)
                im = ax.imshow(np.ma.masked_where(p < 0.05, p), cmap="hot", vmin=0, vmax=1, alpha=0.7,
                               origin="lower", aspect=asp, interpolation="nearest")
                if (p > threshold).any() and not (p > threshold).all():
                    ax.contour(p, levels=[threshold], colors="cyan", linewidths=0.8, origin="lower")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="mean" if row == 0 else None)
            elif kind == "var":
                im = ax.imshow(_slice(var, axis, k), cmap="magma", vmin=0, vmax=vmax_var, origin="lower",
                               aspect=asp, interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="variance" if row == 0 else None)
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{view} (axis {axis} = {k})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def montage(image, gt, mean, var, path, title: str = "", *, spacing: Optional[Sequence[float]] = None) -> Path:
    """``case_figure`` from a multi-channel image (C, D, H, W): FLAIR is channel 3 (t1, t1ce, t2, flair)."""
    image = _np(image)
    flair = image[3] if image.ndim == 4 and image.shape[0] >= 4 else (image[-1] if image.ndim == 4 else image)
    return case_figure(flair, gt, mean, var, path, title, spacing=spacing)


def _per_region(result: Dict[str, Any]) -> Dict[str, Tuple[List[float], List[float], int]]:
    """{region: (dice values, finite hd95 values, number of infinite hd95)} from evaluate's or sample's metrics."""
    cases = result.get("cases", [])
    regions = list(result.get("regions", {})) or ["WT"]
    out = {}
    for name in regions:
        recs = [c[name] if name in c else c for c in cases]
        d = [float(r["dice"]) for r in recs if r.get("dice") is not None]
        h = [float(r["hd95"]) for r in recs if r.get("hd95") is not None]
        out[name] = (d, h, len(recs) - len(h))
    return out


def summary_figure(result: Dict[str, Any], path, title: str = "") -> Path:
    """Dice and HD95 distributions per region (box plot + every case as a dot)."""
    data = _per_region(result)
    names = list(data)
    fig = _figure(4 + 1.6 * len(names), 4.2)
    ax_d, ax_h = fig.subplots(1, 2)
    rng = np.random.default_rng(0)  # fixed jitter: identical figures for identical metrics
    for ax, idx, label in ((ax_d, 0, "Dice"), (ax_h, 1, "HD95 (mm)")):
        values = [data[n][idx] for n in names]
        ax.boxplot([v if v else [np.nan] for v in values], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names)
        for i, v in enumerate(values, start=1):
            if v:
                ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=12, alpha=0.7, color="tab:blue", zorder=3)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_d.set_ylim(-0.02, 1.02)
    ax_d.set_xticklabels([f"{n}\nn={len(data[n][0])}" + (f", mean {np.mean(data[n][0]):.3f}" if data[n][0] else "")
                          for n in names], fontsize=8)
    ax_h.set_xticklabels([f"{n}\nn={len(data[n][1])}" + (f", {data[n][2]} inf" if data[n][2] else "")
                          for n in names], fontsize=8)
    ax_d.set_title("Dice per case")
    ax_h.set_title("HD95 per case (finite)")
    return _save(fig, path, title)


def uncertainty_figure(cases: Sequence[Dict[str, Any]], path, title: str = "") -> Path:
    """Reliability diagram of the ensemble mean (pooled over ``cases``, each case's curve thin)
    and the per-case AUROC of voxel variance for errors.  ``cases``: records with
    ``case``, ``auroc_var_error`` and ``reliability`` (:func:`patchddm_fast.eval.uncertainty.uncertainty_metrics`)."""
    fig = _figure(9, 4.2)
    ax_r, ax_a = fig.subplots(1, 2)
    ax_r.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfectly calibrated")
    for c in cases:
        pts = [(b["mean_prob"], b["frequency"]) for b in c["reliability"]["bins"] if b["count"]]
        ax_r.plot(*zip(*pts), color="tab:blue", alpha=0.25, lw=0.8)
    pooled = pooled_reliability([c["reliability"] for c in cases])
    pts = [(b["mean_prob"], b["frequency"], b["count"]) for b in pooled["bins"] if b["count"]]
    ax_r.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue",
              label=f"pooled, ECE {pooled['ece']:.4f}")
    for x, y, n in pts:
        ax_r.annotate(f"{n}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax_r.set_xlim(0, 1)
    ax_r.set_ylim(0, 1)
    ax_r.set_xlabel("ensemble mean (bin average)")
    ax_r.set_ylabel("observed tumour frequency")
    ax_r.set_title("Reliability (numbers: voxels per bin)")
    ax_r.legend(fontsize=7, loc="upper left")
    names = [str(c["case"]) for c in cases]
    vals = [c["auroc_var_error"] for c in cases]
    ax_a.bar(range(len(names)), [v if v is not None else 0.0 for v in vals], color="tab:orange")
    for i, v in enumerate(vals):
        ax_a.text(i, (v or 0.0) + 0.01, "n/a" if v is None else f"{v:.3f}", ha="center", fontsize=7)
    ax_a.axhline(0.5, color="0.6", ls="--", lw=1)
    ax_a.set_xticks(range(len(names)))
    ax_a.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax_a.set_ylim(0, 1.05)
    ax_a.set_ylabel("AUROC")
    ax_a.set_title("Variance as an error detector (AUROC)")
    return _save(fig, path, title)
