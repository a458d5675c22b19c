"""Sample held-out cases with an ensemble and write what a person wants to look at.

Shared by ``patchddm sample`` and ``patchddm demo``: per case NIfTI files of the image,
ground truth, ensemble mean, variance and thresholded mask, a PNG montage, and one
``metrics.json`` (``{"cases": [{"case", "dice", "hd95", ...}], "mean": {"dice", "hd95"}}``).
Per case it also scores the uncertainty (:mod:`patchddm_fast.eval.uncertainty`: AUROC of the
variance for voxel errors, reliability table and ECE of the mean), drawn in ``uncertainty.png``.
HD95 of an empty prediction is infinite; JSON has no infinity, so it is written as
``null`` and the mean HD95 is taken over finite cases (their count is reported).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np

from patchddm_fast.analysis.planner import plan_sampling
from patchddm_fast.training.cases import CaseSource, read_whole
from patchddm_fast.data.phantom import CHANNELS
from patchddm_fast.eval.lesionwise import lesion_wise
from patchddm_fast.eval.metrics import dice, hd95
from patchddm_fast.data.regions import REGION_NAMES, label_map, nest_regions, region_masks
from patchddm_fast.diffusion.samplers import DEFAULT_SAMPLER
from patchddm_fast.sampling.segment import segment_volume
from patchddm_fast.eval.uncertainty import uncertainty_metrics


def _finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


def write_nifti(array: np.ndarray, path: Path, affine=None) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))


def summarise(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Means of Dice and finite HD95 over cases, with the count of cases whose HD95 is infinite
    (an empty prediction or ground truth).  ``dice`` and ``hd95`` are always present; a mean
    over no finite value is None (JSON null), never NaN."""
    out: Dict[str, Any] = {}
    for key in ("dice", "hd95", "dice_single_sample", "lesion_wise_dice", "lesion_wise_hd95", "auroc_var_error",
                "ece"):
        vals = [r[key] for r in records if r.get(key) is not None]
        if vals or key in ("dice", "hd95"):
            out[key] = float(np.mean(vals)) if vals else None
    out["n_cases"] = len(records)
    out["n_hd95_infinite"] = sum(1 for r in records if r.get("hd95") is None)
    return out


def region_scores(pred: np.ndarray, single: np.ndarray, gt: np.ndarray, mean: np.ndarray, var: np.ndarray,
                  threshold: float) -> Dict[str, Any]:
    """One region's scores: Dice, HD95, single-sample Dice, BraTS 2023 lesion-wise Dice/HD95,
    and how well the ensemble variance predicts errors (AUROC) and the mean is calibrated (ECE)."""
    lw = lesion_wise(pred, gt)
    unc = uncertainty_metrics(mean, var, gt, threshold=threshold)
    return dict(dice=dice(pred, gt), hd95=_finite_or_none(hd95(pred, gt)), dice_single_sample=dice(single, gt),
                lesion_wise_dice=lw.dice, lesion_wise_hd95=lw.hd95, lesions_tp_fn_fp=[lw.n_tp, lw.n_fn, lw.n_fp],
                tumour_voxels=int(gt.sum()), predicted_voxels=int(pred.sum()), auroc_var_error=unc["auroc_var_error"],
                ece=unc["reliability"]["ece"], error_voxels=unc["error_voxels"], reliability=unc["reliability"])


def evaluate_cases(model, diffusion, method: str, cases: Sequence[CaseSource], out_dir: Path, *, ensemble: int,
                   steps: int, seed: int, progress: bool = True, figures: bool = True,
                   memory_budget: Optional[str] = None, eta: float = 0.0, threshold: float = 0.5,
                   overwrite: bool = True, sampler: str = DEFAULT_SAMPLER,
                   member_batch: Optional[int] = None, convention: Optional[str] = None) -> Dict[str, Any]:
    """Sample, score and write every case into ``out_dir``.  Case ids must be plain names and
    every file stays inside ``out_dir``; existing outputs are refused unless ``overwrite``
    (``sample`` passes its --overwrite flag; the demo owns its folder and refreshes it).

    A region model (3 output channels) is scored per region (WT/TC/ET, with lesion-wise and
    uncertainty scores) against the ground truth's labels read in ``convention``; its
    top-level scores are the whole tumour's."""
    from patchddm_fast.training.checkpoint import atomic_write_text
    from patchddm_fast.core.safe_paths import check_case_id, check_targets, confined, output_folder

    out_dir = output_folder(out_dir, "--out")
    targets = [confined(out_dir, "metrics.json")] + ([confined(out_dir, "uncertainty.png")] if figures else [])
    stats = ("mean", "var") + tuple(f"{k}_{r}" for k in ("mean", "var") for r in REGION_NAMES)
    for case in cases:
        check_case_id(case.case_id)
        names = [f"{case.case_id}_{s}.nii.gz" for s in ("image", "gt", "seg") + stats]
        targets += [confined(out_dir, n) for n in names + ([f"{case.case_id}_montage.png"] if figures else [])]
    check_targets(targets, overwrite=overwrite, folder=out_dir)
    records = []
    for case in cases:
        image, label = read_whole(case, binary=False)
        started = time.perf_counter()
        plan = (plan_sampling(model, memory_budget, method, image.shape, ensemble if member_batch is None else 1)
                if memory_budget else None)
        res = segment_volume(model, diffusion, image, method=method, ensemble=ensemble, steps=steps,
                             seed=seed, progress=progress, desc=case.case_id, keep_samples=True,
                             plan=plan, eta=eta, threshold=threshold, sampler=sampler,
                             member_batch=member_batch)
        sampling_s = time.perf_counter() - started
        prefix = out_dir / case.case_id
        is_regions = res.mask.dim() == 4
        if is_regions:
            conv = convention or "brats2020"
            gt_regions = region_masks(label.numpy(), conv)
            pred_regions = res.mask.numpy()
            single_regions = nest_regions((res.samples[0] > threshold).numpy())
            per_region = {name: region_scores(pred_regions[i], single_regions[i], gt_regions[i], res.mean[i].numpy(),
                                              res.var[i].numpy(), threshold) for i, name in enumerate(REGION_NAMES)}
            records.append(dict(case=case.case_id, **per_region["WT"], regions=per_region,
                                sampling_s=round(sampling_s, 3)))
            gt, seg = label.numpy().astype(np.uint8), label_map(pred_regions, conv)
            mean_wt, var_wt = res.mean[0].numpy(), res.var[0].numpy()
            for i, name in enumerate(REGION_NAMES):
                write_nifti(res.mean[i].numpy().astype(np.float32), Path(f"{prefix}_mean_{name}.nii.gz"))
                write_nifti(res.var[i].numpy().astype(np.float32), Path(f"{prefix}_var_{name}.nii.gz"))
        else:
            gt = (label > 0).numpy()
            seg = res.mask.numpy()
            mean_wt, var_wt = res.mean.numpy(), res.var.numpy()
            records.append(dict(case=case.case_id, **region_scores(seg, (res.samples[0] > threshold).numpy(), gt,
                                                                   mean_wt, var_wt, threshold),
                                sampling_s=round(sampling_s, 3)))
            write_nifti(mean_wt.astype(np.float32), Path(f"{prefix}_mean.nii.gz"))
            write_nifti(var_wt.astype(np.float32), Path(f"{prefix}_var.nii.gz"))
        write_nifti(np.moveaxis(image.numpy(), 0, -1).astype(np.float32), Path(f"{prefix}_image.nii.gz"))
        write_nifti(gt.astype(np.uint8), Path(f"{prefix}_gt.nii.gz"))
        write_nifti(seg.astype(np.uint8), Path(f"{prefix}_seg.nii.gz"))
        if figures:
            from patchddm_fast.eval.figures import case_figure

            case_figure(image[CHANNELS.index("flair")].numpy(), gt > 0, mean_wt, var_wt,
                        Path(f"{prefix}_montage.png"), title=f"{case.case_id}: Dice {records[-1]['dice']:.3f}")
    if figures and records:
        from patchddm_fast.eval.figures import uncertainty_figure

        uncertainty_figure(records, out_dir / "uncertainty.png",
                           title=f"ensemble {ensemble}, {sampler} {steps} steps: variance vs errors, calibration")
    metrics = dict(cases=records, mean=summarise(records),
                   sampling=dict(method=method, ensemble=ensemble, steps=steps, seed=seed, sampler=sampler))
    if records and "regions" in records[0]:
        metrics["label_convention"] = convention or "brats2020"
        metrics["regions"] = {name: summarise([r["regions"][name] for r in records]) for name in REGION_NAMES}
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def format_table(metrics: Dict[str, Any]) -> str:
    lines = ["| case | Dice (ensemble) | Dice (1 sample) | HD95 mm |", "|---|---|---|---|"]
    for r in metrics["cases"]:
        h = "inf" if r["hd95"] is None else f"{r['hd95']:.2f}"
        lines.append(f"| {r['case']} | {r['dice']:.4f} | {r['dice_single_sample']:.4f} | {h} |")
    m = metrics["mean"]

    def cell(key: str, fmt: str, missing: str = "n/a") -> str:
        return missing if m.get(key) is None else format(m[key], fmt)

    lines.append(f"| **mean** | {cell('dice', '.4f')} | {cell('dice_single_sample', '.4f')} | "
                 f"{cell('hd95', '.2f', 'inf (every case)')} |")
    if m.get("auroc_var_error") is not None or m.get("ece") is not None:
        lines.append(f"\nuncertainty: mean AUROC of variance for voxel errors {cell('auroc_var_error', '.4f')}, "
                     f"mean ECE of the ensemble mean {cell('ece', '.4f')} (uncertainty.png)")
    if "regions" in metrics:
        lines += ["", "| region | Dice (ensemble) | Dice (1 sample) | HD95 mm | lesion-wise Dice | lesion-wise HD95 mm |",
                  "|---|---|---|---|---|---|"]
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
        for name, s in metrics["regions"].items():
            lines.append(f"| {name} | {f(s['dice'], '.4f')} | {f(s.get('dice_single_sample'), '.4f')} | "
                         f"{f(s['hd95'], '.2f')} | {f(s.get('lesion_wise_dice'), '.4f')} | "
                         f"{f(s.get('lesion_wise_hd95'), '.2f')} |")
    return "\n".join(lines)
