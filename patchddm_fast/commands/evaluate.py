"""``patchddm evaluate``: Dice and HD95 (mm) of a prediction folder against ground truth.

* Predictions: ``<case>_seg.nii.gz`` in ``--pred`` (what ``patchddm predict`` writes).
* Ground truth ``--gt``: a dataset folder in any supported layout (labels of its cases),
  or a flat folder of ``<case>.nii.gz`` / ``<case>_seg.nii.gz`` label files.
* Every pair must share shape and affine (else an error names both files); HD95 uses the
  ground truth header's zooms as voxel spacing, so anisotropic scans are measured in mm.
* ``--labels binary``: foreground = label > 0 in both (whole tumour).  ``--labels brats``:
  the BraTS regions WT (1,2,4), TC (1,4), ET (4) of multi-class maps; ``brats2023``
  uses ET = 3.
* Outputs: ``--out metrics.json`` and a CSV beside it (same name, ``.csv``).  Per case and
  region: Dice, HD95, voxel counts; per region: mean / median / std (population, ddof=0)
  of Dice over all cases and of HD95 over the cases where it is finite.  HD95 is infinite
  when exactly one of prediction and ground truth is empty: JSON has no Infinity, so it is
  written as ``null`` (and as ``inf`` in the CSV), and such cases are counted in
  ``n_hd95_infinite``; empty ground truths / predictions are counted too.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

LABEL_MODES = ("binary", "brats", "brats2023")


def region_definitions(mode: str) -> Dict[str, Optional[Tuple[int, ...]]]:
    """Region name -> label values counted as foreground (None = any nonzero)."""
    from patchddm_fast.io.layouts import BRATS2023_REGIONS, BRATS_REGIONS

    if mode == "binary":
        return {"WT": None}
    if mode == "brats":
        return dict(BRATS_REGIONS)
    if mode == "brats2023":
        return dict(BRATS2023_REGIONS)
    raise ValueError(f"--labels must be one of {LABEL_MODES}, got {mode!r}")


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.io.layouts import LAYOUTS

    p = sub.add_parser(
        "evaluate", help="Dice and HD95 of predicted masks against ground-truth labels",
        description="Compare <case>_seg.nii.gz files with ground-truth labels: per-case Dice and HD95 in mm, "
        "mean/median/std, JSON + CSV, BraTS regions for multi-class labels, optional PNG figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder with <case>_seg.nii.gz predictions")
    p.add_argument("--gt", required=True, metavar="DIR",
                   help="dataset folder (BraTS / nnU-Net / preprocessed) or flat folder of <case>[_seg].nii.gz labels")
    p.add_argument("--out", required=True, metavar="JSON", help="metrics JSON to write (a .csv is written beside it)")
    p.add_argument("--labels", default="binary", choices=LABEL_MODES,
                   help="binary: label > 0 (whole tumour); brats: WT/TC/ET regions of labels {0,1,2,4}; "
                        "brats2023: same with ET = 3")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="layout of a --gt dataset folder")
    p.add_argument("--figures", nargs="?", const="", default=None, metavar="DIR",
                   help="write a PNG per case and a summary figure (default folder: <out stem>_figures)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics JSON/CSV (never an input)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return p


def ground_truth(gt: Path, layout: str = "auto") -> Tuple[Dict[str, Path], Dict[str, Path]]:
    """({case: label file}, {case: FLAIR file}) from a dataset folder or a flat label folder."""
    from patchddm_fast.io.errors import DatasetError
    from patchddm_fast.io.layouts import label_files, open_dataset

    try:
        ds = open_dataset(gt, layout=layout, require_labels=True)
    except DatasetError:
        if layout != "auto" or not Path(gt).is_dir():
            raise
        flat = label_files(gt)
        if not flat:
            raise
        labels: Dict[str, Path] = {}
        for stem, path in flat.items():
            cid = stem[: -len("_seg")] if stem.endswith("_seg") else stem
            if cid in labels:
                raise DatasetError(f"{gt}: two label files for case {cid}: {labels[cid].name} and {path.name}")
            labels[cid] = path
        return labels, {}
    flair_idx = ds.channel_names.index("flair") if "flair" in ds.channel_names else len(ds.channel_names) - 1
    return ({c.case_id: c.label for c in ds.cases},
            {c.case_id: c.images[flair_idx] for c in ds.cases})


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def evaluate_case(pred_path: Path, gt_path: Path, mode: str) -> Dict[str, Any]:
    """Metrics of one prediction/ground-truth pair for every region of ``mode``."""
    from patchddm_fast.io.errors import DatasetError
    from patchddm_fast.io.nifti import affines_match, load_volume
    from patchddm_fast.io.volumes import check_label_values
    from patchddm_fast.metrics import dice, hd95

    regions = region_definitions(mode)
    allowed = None if mode == "binary" else sorted({0, *[v for r in regions.values() for v in r]})
    pred_f, pred_img = load_volume(pred_path)
    gt_f, gt_img = load_volume(gt_path)
    if pred_f.shape != gt_f.shape:
        raise DatasetError(f"{pred_path}: shape {pred_f.shape} does not match ground truth {gt_path} {gt_f.shape}")
    if not affines_match(pred_img.affine, gt_img.affine):
        diff = float(np.abs(pred_img.affine - gt_img.affine).max())
        raise DatasetError(f"{pred_path}: affine does not match ground truth {gt_path} (max abs difference {diff:.4g})")
    pred = check_label_values(pred_f, pred_path, allowed)
    gt = check_label_values(gt_f, gt_path, allowed)
    spacing = tuple(float(z) for z in gt_img.header.get_zooms()[:3])
    rec: Dict[str, Any] = dict(case=None, pred=str(pred_path), gt=str(gt_path), spacing=list(spacing))
    for name, values in regions.items():
        p = pred > 0 if values is None else np.isin(pred, values)
        g = gt > 0 if values is None else np.isin(gt, values)
        rec[name] = dict(dice=float(dice(p, g)), hd95=_finite(hd95(p, g, spacing=spacing, pooled=False)),
                         gt_voxels=int(g.sum()), pred_voxels=int(p.sum()))
    return rec


def summarise(records: List[Dict[str, Any]], regions) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in regions:
        rs = [r[name] for r in records]
        d = np.array([r["dice"] for r in rs], dtype=np.float64)
        h = np.array([r["hd95"] for r in rs if r["hd95"] is not None], dtype=np.float64)
        stats = lambda a: dict(mean=float(a.mean()), median=float(np.median(a)), std=float(a.std())) if a.size else \
            dict(mean=None, median=None, std=None)
        out[name] = dict(n_cases=len(rs), dice=stats(d), hd95=stats(h), n_hd95_finite=int(h.size),
                         n_hd95_infinite=len(rs) - int(h.size),
                         n_gt_empty=sum(r["gt_voxels"] == 0 for r in rs),
                         n_pred_empty=sum(r["pred_voxels"] == 0 for r in rs),
                         n_both_empty=sum(r["gt_voxels"] == 0 and r["pred_voxels"] == 0 for r in rs))
    return out


def evaluate_folders(pred_dir, gt, *, labels: str = "binary", layout: str = "auto") -> Dict[str, Any]:
    """Match ``<case>_seg`` predictions with ground truth and compute every metric (no files written)."""
    from patchddm_fast.io.errors import DatasetError
    from patchddm_fast.io.layouts import label_files

    regions = region_definitions(labels)
    preds = label_files(pred_dir, suffix="_seg")
    gts, _ = ground_truth(Path(gt), layout)
    matched = sorted(set(preds) & set(gts))
    if not matched:
        raise DatasetError(f"{pred_dir}: no <case>_seg.nii.gz prediction matches a ground-truth case in {gt} "
                           f"({len(preds)} predictions, {len(gts)} labelled cases)")
    records = []
    for cid in matched:
        rec = evaluate_case(preds[cid], gts[cid], labels)
        rec["case"] = cid
        records.append(rec)
    return dict(
        labels=labels,
        regions={k: (list(v) if v is not None else "label > 0") for k, v in regions.items()},
        spacing_source="ground-truth header zooms (mm)",
        hd95_definition="max of the two directed 95th percentiles of surface distances (pooled=False)",
        notes="hd95 null = infinite (exactly one of prediction / ground truth empty); HD95 summaries use the "
              "finite cases only (count: n_hd95_finite); dice summaries use all cases; std is the population std",
        cases=records, summary=summarise(records, regions),
        missing_predictions=sorted(set(gts) - set(preds)),
        unmatched_predictions=sorted(set(preds) - set(gts)),
    )


def check_metrics_targets(result: Dict[str, Any], out: Path, overwrite: bool,
                          figures: Optional[Path] = None) -> None:
    """--out must be a file path; its JSON and CSV (and the figures) never replace an input,
    nor an existing file without --overwrite; figure names stay inside the figures folder."""
    from patchddm_fast.io.errors import DatasetError
    from patchddm_fast.safe_paths import check_case_id, check_targets, confined

    out = Path(out)
    if out.is_dir():
        raise DatasetError(f"{out}: --out must be the path of a JSON file, but it is a folder")
    inputs = [f for rec in result["cases"] for f in (rec["pred"], rec["gt"])]
    check_targets([out, out.with_suffix(".csv")], overwrite=overwrite, inputs=inputs, folder=out.parent)
    if figures is not None:
        names = [f"{check_case_id(rec['case'])}.png" for rec in result["cases"]] + ["summary.png"]
        check_targets([confined(figures, n) for n in names], overwrite=overwrite, inputs=inputs, folder=figures)


def write_metrics(result: Dict[str, Any], out: Path) -> Tuple[Path, Path]:
    """Strict JSON (no NaN/Infinity) plus a long-format CSV (one row per case and region) beside it;
    both written atomically."""
    import io

    from patchddm_fast.checkpoint import atomic_write_text
    from patchddm_fast.safe_paths import output_folder

    out = Path(out)
    output_folder(out.parent, "--out's folder")
    atomic_write_text(out, json.dumps(result, indent=1, allow_nan=False) + "\n")
    csv_path = out.with_suffix(".csv")
    regions = list(result["regions"])
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "region", "dice", "hd95_mm", "gt_voxels", "pred_voxels"])
        for rec in result["cases"]:
            for name in regions:
                r = rec[name]
                w.writerow([rec["case"], name, repr(r["dice"]), "inf" if r["hd95"] is None else repr(r["hd95"]),
                            r["gt_voxels"], r["pred_voxels"]])
        atomic_write_text(csv_path, f.getvalue())
    return out, csv_path


def format_summary(result: Dict[str, Any]) -> str:
    lines = ["| region | cases | Dice mean | Dice median | Dice std | HD95 mean (mm) | HD95 median | inf HD95 | empty gt |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['n_cases']} | {f(s['dice']['mean'])} | {f(s['dice']['median'])} | "
                     f"{f(s['dice']['std'])} | {f(s['hd95']['mean'])} | {f(s['hd95']['median'])} | "
                     f"{s['n_hd95_infinite']} | {s['n_gt_empty']} |")
    return "\n".join(lines)


def write_figures(result: Dict[str, Any], pred_dir: Path, gt: Path, folder: Path, layout: str = "auto") -> List[Path]:
    """PNG per case (FLAIR when the ground truth has images, GT, prediction, variance) + a summary figure."""
    from patchddm_fast.io.nifti import load_volume
    from patchddm_fast.report import case_figure, summary_figure

    from patchddm_fast.safe_paths import check_case_id, confined, output_folder

    output_folder(folder, "--figures")
    _, flairs = ground_truth(gt, layout)
    written = []
    for rec in result["cases"]:
        cid = rec["case"]
        gt_arr = load_volume(rec["gt"])[0] > 0
        seg = load_volume(rec["pred"])[0] > 0
        prob_path, var_path = pred_dir / f"{cid}_prob.nii.gz", pred_dir / f"{cid}_var.nii.gz"
        prob = load_volume(prob_path)[0] if prob_path.is_file() else seg.astype(np.float32)
        var = load_volume(var_path)[0] if var_path.is_file() else np.zeros(seg.shape, np.float32)
        flair = load_volume(flairs[cid])[0] if cid in flairs else np.zeros(seg.shape, np.float32)
        first = next(iter(result["regions"]))
        h = rec[first]["hd95"]
        title = f"{cid}: {first} Dice {rec[first]['dice']:.3f}, HD95 {'inf' if h is None else f'{h:.1f}'} mm"
        written.append(case_figure(flair, gt_arr, prob, var, confined(folder, f"{check_case_id(cid)}.png"), title=title,
                                   spacing=rec["spacing"]))
    written.append(summary_figure(result, folder / "summary.png"))
    return written


def run(args: argparse.Namespace) -> int:
    result = evaluate_folders(Path(args.pred), Path(args.gt), labels=args.labels, layout=args.layout)
    out = Path(args.out)
    folder = None
    if args.figures is not None:
        folder = Path(args.figures) if args.figures else out.with_name(out.stem + "_figures")
    check_metrics_targets(result, out, args.overwrite, folder)
    json_path, csv_path = write_metrics(result, out)
    if folder is not None:
        write_figures(result, Path(args.pred), Path(args.gt), folder, args.layout)
    if not args.quiet:
        print(format_summary(result))
        if result["missing_predictions"]:
            print(f"warning: {len(result['missing_predictions'])} ground-truth case(s) have no prediction, e.g. "
                  f"{result['missing_predictions'][:3]}", file=sys.stderr)
        print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
    return 0
