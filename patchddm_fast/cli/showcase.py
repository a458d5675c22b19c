"""Sample held-out cases with an ensemble and write what a person wants to look at.

Shared by ``patchddm sample`` and ``patchddm demo``: per case NIfTI files of the image,
ground truth, ensemble mean, variance and thresholded mask (on the case's own grid, with its
affine: a phantom's 1 mm grid, a dataset case's network grid placed in the scan's world
coordinates), a PNG montage, and one ``metrics.json``
(``{"cases": [{"case", "dice", "hd95", ...}], "mean": {"dice", "hd95"}}``).  The scores
themselves (Dice, HD95, lesion-wise, uncertainty) are :mod:`patchddm_fast.eval.scoring`'s;
this module samples, writes and draws (``uncertainty.png``: variance vs errors, calibration).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from patchddm_fast.analysis.planner import plan_sampling
from patchddm_fast.core.files import atomic_write_text
from patchddm_fast.core.safe_paths import check_case_id, check_targets, confined, output_folder
from patchddm_fast.data.layouts import MODALITIES
from patchddm_fast.data.nifti import save_volume
from patchddm_fast.data.regions import REGION_NAMES, label_map
from patchddm_fast.diffusion.samplers import DEFAULT_SAMPLER
from patchddm_fast.eval.scoring import case_scores, summarise, summarise_regions
from patchddm_fast.sampling.segment import segment_volume
from patchddm_fast.training.cases import CaseSource, read_whole


def evaluate_cases(model, diffusion, method: str, cases: Sequence[CaseSource], out_dir: Path, *, ensemble: int,
                   steps: int, seed: int, progress: bool = True, figures: bool = True,
                   memory_budget: Optional[str] = None, eta: float = 0.0, threshold: float = 0.5,
                   overwrite: bool = True, sampler: str = DEFAULT_SAMPLER,
                   member_batch: Optional[int] = None, convention: Optional[str] = None,
                   fill_holes: bool = True) -> Dict[str, Any]:
    """Sample, score (:func:`patchddm_fast.eval.scoring.case_scores`) and write every case into
    ``out_dir``.  Case ids must be plain names and every file stays inside ``out_dir``; existing
    outputs are refused unless ``overwrite`` (``sample`` passes its --overwrite flag; the demo
    owns its folder and refreshes it).

    A region model (3 output channels) is scored per region (WT/TC/ET, with lesion-wise and
    uncertainty scores) against the ground truth's labels read in ``convention``; its
    top-level scores are the whole tumour's."""
    out_dir = output_folder(out_dir, "--out")
    targets = [confined(out_dir, "metrics.json")] + ([confined(out_dir, "uncertainty.png")] if figures else [])
    stats = ("mean", "var") + tuple(f"{k}_{r}" for k in ("mean", "var") for r in REGION_NAMES)
    for case in cases:
        check_case_id(case.case_id)
        names = [f"{case.case_id}_{s}.nii.gz" for s in ("image", "gt", "seg") + stats]
        targets += [confined(out_dir, n) for n in names + ([f"{case.case_id}_montage.png"] if figures else [])]
    check_targets(targets, overwrite=overwrite, folder=out_dir)
    conv = convention or "brats2020"
    records = []
    for case in cases:
        image, label = read_whole(case, binary=False)
        started = time.perf_counter()
        plan = (plan_sampling(model, memory_budget, method, image.shape, ensemble if member_batch is None else 1)
                if memory_budget else None)
        res = segment_volume(model, diffusion, image, method=method, ensemble=ensemble, steps=steps,
                             seed=seed, progress=progress, desc=case.case_id, keep_samples=True,
                             plan=plan, eta=eta, threshold=threshold, sampler=sampler,
                             member_batch=member_batch, fill_holes=fill_holes)
        sampling_s = time.perf_counter() - started
        mask, mean, var, labels = res.mask.numpy(), res.mean.numpy(), res.var.numpy(), label.numpy()
        records.append(dict(case=case.case_id, **case_scores(mask, mean, var, res.samples[0].numpy(), labels,
                                                             threshold, conv, fill_holes),
                            sampling_s=round(sampling_s, 3)))
        prefix, affine = out_dir / case.case_id, case.affine
        if mask.ndim == 4:  # WT/TC/ET regions
            gt, seg = labels.astype(np.uint8), label_map(mask, conv)
            mean_wt, var_wt = mean[0], var[0]
            for i, name in enumerate(REGION_NAMES):
                save_volume(mean[i].astype(np.float32), affine, f"{prefix}_mean_{name}.nii.gz")
                save_volume(var[i].astype(np.float32), affine, f"{prefix}_var_{name}.nii.gz")
        else:
            gt, seg = labels > 0, mask
            mean_wt, var_wt = mean, var
            save_volume(mean_wt.astype(np.float32), affine, f"{prefix}_mean.nii.gz")
            save_volume(var_wt.astype(np.float32), affine, f"{prefix}_var.nii.gz")
        save_volume(np.moveaxis(image.numpy(), 0, -1).astype(np.float32), affine, f"{prefix}_image.nii.gz")
        save_volume(gt.astype(np.uint8), affine, f"{prefix}_gt.nii.gz")
        save_volume(seg.astype(np.uint8), affine, f"{prefix}_seg.nii.gz")
        if figures:
            from patchddm_fast.eval.figures import case_figure

            case_figure(image[MODALITIES.index("flair")].numpy(), gt > 0, mean_wt, var_wt,
                        Path(f"{prefix}_montage.png"), title=f"{case.case_id}: Dice {records[-1]['dice']:.3f}")
    if figures and records:
        from patchddm_fast.eval.figures import uncertainty_figure

        uncertainty_figure(records, out_dir / "uncertainty.png",
                           title=f"ensemble {ensemble}, {sampler} {steps} steps: variance vs errors, calibration")
    metrics = dict(cases=records, mean=summarise(records),
                   sampling=dict(method=method, ensemble=ensemble, steps=steps, seed=seed, sampler=sampler,
                                 threshold=threshold, fill_holes=fill_holes))
    if records and "regions" in records[0]:
        metrics["label_convention"] = conv
        metrics["regions"] = summarise_regions(records)
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
