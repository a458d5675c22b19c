"""``patchddm evaluate``: Dice and HD95 (mm) of a prediction folder against ground truth.

* Predictions: ``<case>_seg.nii.gz`` in ``--pred`` (what ``patchddm predict`` writes).
* Ground truth ``--gt``: a dataset folder in any supported layout (labels of its cases),
  or a flat folder of ``<case>.nii.gz`` / ``<case>_seg.nii.gz`` label files.
* Every pair must share shape and affine (else an error names both files); HD95 uses the
  ground truth header's zooms as voxel spacing, so anisotropic scans are measured in mm.
* ``--labels auto`` (default) detects the label convention from the ground truth's values
  (binary 0/1, BraTS 2020 0/1/2/4, BraTS 2023 0/1/2/3; :mod:`patchddm_fast.data.regions`) and
  scores WT, TC and ET of multi-class maps; binary (0/1) predictions against multi-class
  ground truth are scored as whole tumour only.  ``binary``, ``brats2020`` (``brats``) and
  ``brats2023`` force a convention.
* Per region, beside the whole-mask Dice and HD95, the BraTS 2023 lesion-wise Dice and HD95
  (:mod:`patchddm_fast.eval.lesionwise`), the challenge's ranking metrics since 2023.
* Outputs: ``--out metrics.json`` and a CSV beside it (same name, ``.csv``).  Per case and
  region: Dice, HD95, voxel counts; per region: mean / median / std (population, ddof=0)
  of Dice over all cases and of HD95 over the cases where it is finite.  HD95 is infinite
  when exactly one of prediction and ground truth is empty: JSON has no Infinity, so it is
  written as ``null`` (and as ``inf`` in the CSV), and such cases are counted in
  ``n_hd95_infinite``; empty ground truths / predictions are counted too.
* Uncertainty: when ``<case>_prob`` and ``<case>_var`` maps lie beside a prediction (as
  ``patchddm predict`` writes them), each case also gets ``uncertainty`` (AUROC of the
  variance for voxels where the first region's prediction is wrong, reliability table and
  ECE of the probability; :mod:`patchddm_fast.eval.uncertainty`), the result a summary of it, and
  ``<out stem>_uncertainty.png`` a reliability diagram and the AUROCs.
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

# "auto" detects the convention from the ground truth; "brats" is kept as the older name of "brats2020".
LABEL_MODES = ("auto", "binary", "brats2020", "brats2023", "brats")


def resolve_label_mode(mode: str) -> str:
    """A --labels value -> "auto" or a convention of :mod:`patchddm_fast.data.regions`."""
    if mode not in LABEL_MODES:
        raise ValueError(f"--labels must be one of {LABEL_MODES}, got {mode!r}")
    return "brats2020" if mode == "brats" else mode


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.data.layouts import LAYOUTS

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
    p.add_argument("--labels", default="auto", choices=LABEL_MODES,
                   help="auto: detect from the ground truth's label values; binary: label > 0 (whole tumour); "
                        "brats2020 (or brats): WT/TC/ET regions of labels {0,1,2,4}; brats2023: same with ET = 3")
    p.add_argument("--no-lesion-wise", dest="lesion_wise", action="store_false",
                   help="skip the BraTS 2023 lesion-wise Dice/HD95 (they cost one connected-component pass per region)")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="layout of a --gt dataset folder")
    p.add_argument("--figures", nargs="?", const="", default=None, metavar="DIR",
                   help="write a PNG per case and a summary figure (default folder: <out stem>_figures)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics JSON/CSV (never an input)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return p


def ground_truth(gt: Path, layout: str = "auto") -> Tuple[Dict[str, Path], Dict[str, Path]]:
    """({case: label file}, {case: FLAIR file}) from a dataset folder or a flat label folder."""
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.layouts import label_files, open_dataset

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


def _read_labels(path: Path, allowed) -> Tuple[np.ndarray, Any]:
    from patchddm_fast.data.nifti import load_volume
    from patchddm_fast.data.volumes import check_label_values

    data, img = load_volume(path)
    return check_label_values(data, path, allowed), img


def detect_folder_convention(preds: Dict[str, Path], gts: Dict[str, Path], mode: str) -> Tuple[str, bool]:
    """(convention of the ground truth, whether the predictions are binary whole-tumour masks).

    ``mode`` "auto" reads every ground truth's label values and detects the convention
    (:func:`patchddm_fast.data.regions.detect_convention`).  Whether predictions are whole-tumour
    masks or label maps is read from the ``predict.json`` that ``patchddm predict`` writes
    beside them (its ``target``); without one, predictions holding only 0/1 against
    multi-class ground truth are taken as whole-tumour masks (a binary model's output).
    """
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.regions import LABEL_VALUES, detect_convention

    mode = resolve_label_mode(mode)
    if mode == "auto":
        values: set = set()
        for path in gts.values():
            values |= set(np.unique(_read_labels(path, None)[0]).tolist())
        try:
            convention = detect_convention(values, source=f"ground truth ({len(gts)} label files)")
        except ValueError as exc:
            raise DatasetError(str(exc)) from exc
    else:
        convention = mode
    pred_values = {path: set(np.unique(_read_labels(path, None)[0]).tolist())
                   for cid, path in preds.items() if cid in gts}
    binary_preds = convention != "binary" and all(v <= {0, 1} for v in pred_values.values())
    target = _prediction_target(next(iter(preds.values())).parent) if preds else None
    if target is not None:
        binary_preds = convention != "binary" and target == "binary"
    if convention != "binary" and not binary_preds:
        for path, values in pred_values.items():
            bad = sorted(values - set(LABEL_VALUES[convention]))
            if bad:
                raise DatasetError(f"{path}: unexpected label values {bad} (expected a subset of "
                                   f"{list(LABEL_VALUES[convention])}, the ground truth's {convention} convention)")
    return convention, binary_preds


def _prediction_target(pred_dir: Path) -> Optional[str]:
    """The ``target`` recorded in a prediction folder's predict.json, or None."""
    from patchddm_fast.data.layouts import PREDICTION_MARKER

    marker = Path(pred_dir) / PREDICTION_MARKER
    try:
        return json.loads(marker.read_text()).get("target") if marker.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def evaluate_case(pred_path: Path, gt_path: Path, convention: str, binary_pred: bool = False,
                  lesion_wise: bool = True) -> Dict[str, Any]:
    """Metrics of one prediction/ground-truth pair for every region of ``convention``.

    Per region: Dice and HD95 of the whole masks ("legacy" in BraTS 2023 terms) and, with
    ``lesion_wise``, the BraTS 2023 lesion-wise Dice and HD95 (:mod:`patchddm_fast.eval.lesionwise`).
    """
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.nifti import affines_match
    from patchddm_fast.eval.lesionwise import lesion_wise as lesion_wise_scores
    from patchddm_fast.eval.metrics import dice, hd95
    from patchddm_fast.data.regions import LABEL_VALUES, REGION_NAMES, region_masks

    allowed = LABEL_VALUES[convention] if convention != "binary" else None
    pred, pred_img = _read_labels(pred_path, (0, 1) if binary_pred else allowed)
    gt, gt_img = _read_labels(gt_path, allowed)
    if pred.shape != gt.shape:
        raise DatasetError(f"{pred_path}: shape {pred.shape} does not match ground truth {gt_path} {gt.shape}")
    if not affines_match(pred_img.affine, gt_img.affine):
        diff = float(np.abs(pred_img.affine - gt_img.affine).max())
        raise DatasetError(f"{pred_path}: affine does not match ground truth {gt_path} (max abs difference {diff:.4g})")
    spacing = tuple(float(z) for z in gt_img.header.get_zooms()[:3])
    whole_tumour_only = convention == "binary" or binary_pred
    names = REGION_NAMES[:1] if whole_tumour_only else REGION_NAMES
    p_masks = region_masks(pred, "binary" if whole_tumour_only else convention)
    g_masks = region_masks(gt, "binary" if convention == "binary" else convention)
    rec: Dict[str, Any] = dict(case=None, pred=str(pred_path), gt=str(gt_path), spacing=list(spacing))
    for i, name in enumerate(names):
        p, g = p_masks[i], g_masks[i]
        rec[name] = dict(dice=float(dice(p, g)), hd95=_finite(hd95(p, g, spacing=spacing, pooled=False)),
                         gt_voxels=int(g.sum()), pred_voxels=int(p.sum()))
        if lesion_wise and p.ndim == 3:
            lw = lesion_wise_scores(p, g, spacing)
            rec[name]["lesion_wise"] = dict(dice=lw.dice, hd95=lw.hd95, n_tp=lw.n_tp, n_fn=lw.n_fn, n_fp=lw.n_fp)
    return rec


def _stats(values: List[float]) -> Dict[str, Optional[float]]:
    a = np.asarray(values, dtype=np.float64)
    if not a.size:
        return dict(mean=None, median=None, std=None)
    return dict(mean=float(a.mean()), median=float(np.median(a)), std=float(a.std()))


def summarise(records: List[Dict[str, Any]], regions) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in regions:
        rs = [r[name] for r in records]
        h = [r["hd95"] for r in rs if r["hd95"] is not None]
        out[name] = dict(n_cases=len(rs), dice=_stats([r["dice"] for r in rs]), hd95=_stats(h),
                         n_hd95_finite=len(h), n_hd95_infinite=len(rs) - len(h),
                         n_gt_empty=sum(r["gt_voxels"] == 0 for r in rs),
                         n_pred_empty=sum(r["pred_voxels"] == 0 for r in rs),
                         n_both_empty=sum(r["gt_voxels"] == 0 and r["pred_voxels"] == 0 for r in rs))
        lws = [r["lesion_wise"] for r in rs if "lesion_wise" in r]
        if lws:
            out[name]["lesion_wise"] = dict(dice=_stats([r["dice"] for r in lws]), hd95=_stats([r["hd95"] for r in lws]),
                                            n_tp=sum(r["n_tp"] for r in lws), n_fn=sum(r["n_fn"] for r in lws),
                                            n_fp=sum(r["n_fp"] for r in lws))
    return out


def evaluate_folders(pred_dir, gt, *, labels: str = "auto", layout: str = "auto",
                     lesion_wise: bool = True) -> Dict[str, Any]:
    """Match ``<case>_seg`` predictions with ground truth and compute every metric (no files written)."""
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.layouts import label_files
    from patchddm_fast.data.regions import REGION_NAMES, REGIONS

    preds = label_files(pred_dir, suffix="_seg")
    gts, _ = ground_truth(Path(gt), layout)
    matched = sorted(set(preds) & set(gts))
    if not matched:
        raise DatasetError(f"{pred_dir}: no <case>_seg.nii.gz prediction matches a ground-truth case in {gt} "
                           f"({len(preds)} predictions, {len(gts)} labelled cases)")
    convention, binary_preds = detect_folder_convention({c: preds[c] for c in matched},
                                                        {c: gts[c] for c in matched}, labels)
    names = REGION_NAMES[:1] if convention == "binary" or binary_preds else REGION_NAMES
    records = []
    for cid in matched:
        rec = evaluate_case(preds[cid], gts[cid], convention, binary_preds, lesion_wise)
        rec["case"] = cid
        unc = case_uncertainty(Path(pred_dir), cid, preds[cid], gts[cid])
        if unc is not None:
            rec["uncertainty"] = unc
        records.append(rec)
    regions = {n: (list(REGIONS[convention][n]) if convention != "binary" else "label > 0") for n in names}
    return dict(
        labels=convention,
        label_mode=resolve_label_mode(labels),
        binary_predictions=binary_preds,
        regions=regions,
        spacing_source="ground-truth header zooms (mm)",
        hd95_definition="max of the two directed 95th percentiles of surface distances (pooled=False)",
        lesion_wise_definition=("BraTS 2023 lesion-wise (GLI parameters: 26-connected lesions, 3 dilations with "
                                "the 18-neighbour element, lesions <= 50 mm^3 ignored, 374 mm per false positive); "
                                "see patchddm_fast/eval/lesionwise.py") if lesion_wise else None,
        notes="hd95 null = infinite (exactly one of prediction / ground truth empty); HD95 summaries use the "
              "finite cases only (count: n_hd95_finite); dice summaries use all cases; std is the population std"
              + ("; predictions are binary, so only the whole tumour (WT) is scored" if binary_preds else ""),
        cases=records, summary=summarise(records, names),
        missing_predictions=sorted(set(gts) - set(preds)),
        unmatched_predictions=sorted(set(preds) - set(gts)),
        **_uncertainty_summary(records),
    )


def case_uncertainty(pred_dir: Path, cid: str, pred_path: Path, gt_path: Path) -> Optional[Dict[str, Any]]:
    """Uncertainty metrics of one case's whole tumour from its probability and variance maps:
    ``_prob``/``_var`` of a whole-tumour model, or ``_prob_WT``/``_var_WT`` of a region model
    (None when neither pair exists).  WT is every nonzero label in every convention."""
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.nifti import load_volume
    from patchddm_fast.eval.uncertainty import uncertainty_metrics

    for tag in ("", "_WT"):
        prob_path, var_path = pred_dir / f"{cid}_prob{tag}.nii.gz", pred_dir / f"{cid}_var{tag}.nii.gz"
        if prob_path.is_file() and var_path.is_file():
            break
    else:
        return None
    gt = load_volume(gt_path)[0] > 0
    seg = load_volume(pred_path)[0] > 0
    prob, var = load_volume(prob_path)[0], load_volume(var_path)[0]
    for path, arr in ((prob_path, prob), (var_path, var)):
        if arr.shape != gt.shape:
            raise DatasetError(f"{path}: shape {arr.shape} does not match ground truth {gt_path} {gt.shape}")
        if not np.isfinite(arr).all():
            raise DatasetError(f"{path}: contains NaN or infinite values")
    rec = uncertainty_metrics(prob, var, gt, pred=seg)
    rec["region"] = "WT"
    return rec


def _uncertainty_summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    from patchddm_fast.eval.uncertainty import summarise_uncertainty

    with_maps = [r["uncertainty"] for r in records if "uncertainty" in r]
    return dict(uncertainty=summarise_uncertainty(with_maps)) if with_maps else {}


def check_metrics_targets(result: Dict[str, Any], out: Path, overwrite: bool,
                          figures: Optional[Path] = None) -> None:
    """--out must be a file path; its JSON and CSV (and the figures) never replace an input,
    nor an existing file without --overwrite; figure names stay inside the figures folder."""
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.core.safe_paths import check_case_id, check_targets, confined

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

    from patchddm_fast.core.files import atomic_write_text
    from patchddm_fast.core.safe_paths import output_folder

    out = Path(out)
    output_folder(out.parent, "--out's folder")
    atomic_write_text(out, json.dumps(result, indent=1, allow_nan=False) + "\n")
    csv_path = out.with_suffix(".csv")
    regions = list(result["regions"])
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "region", "dice", "hd95_mm", "gt_voxels", "pred_voxels", "lesion_wise_dice",
                    "lesion_wise_hd95_mm", "lesions_tp", "lesions_fn", "lesions_fp"])
        for rec in result["cases"]:
            for name in regions:
                r = rec[name]
                lw = r.get("lesion_wise")
                lw_cells = [repr(lw["dice"]), repr(lw["hd95"]), lw["n_tp"], lw["n_fn"], lw["n_fp"]] if lw else [""] * 5
                w.writerow([rec["case"], name, repr(r["dice"]), "inf" if r["hd95"] is None else repr(r["hd95"]),
                            r["gt_voxels"], r["pred_voxels"], *lw_cells])
        atomic_write_text(csv_path, f.getvalue())
    return out, csv_path


def format_summary(result: Dict[str, Any]) -> str:
    lines = ["| region | cases | Dice mean | Dice median | Dice std | HD95 mean (mm) | HD95 median | inf HD95 | empty gt "
             "| lesion-wise Dice | lesion-wise HD95 (mm) | lesions TP/FN/FP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v:.4f}"
    for name, s in result["summary"].items():
        lw = s.get("lesion_wise")
        lw_cells = (f"{f(lw['dice']['mean'])} | {f(lw['hd95']['mean'])} | {lw['n_tp']}/{lw['n_fn']}/{lw['n_fp']}"
                    if lw else "n/a | n/a | n/a")
        lines.append(f"| {name} | {s['n_cases']} | {f(s['dice']['mean'])} | {f(s['dice']['median'])} | "
                     f"{f(s['dice']['std'])} | {f(s['hd95']['mean'])} | {f(s['hd95']['median'])} | "
                     f"{s['n_hd95_infinite']} | {s['n_gt_empty']} | {lw_cells} |")
    return "\n".join(lines)


def write_figures(result: Dict[str, Any], pred_dir: Path, gt: Path, folder: Path, layout: str = "auto") -> List[Path]:
    """PNG per case (FLAIR when the ground truth has images, GT, prediction, variance) + a summary figure."""
    from patchddm_fast.data.nifti import load_volume
    from patchddm_fast.eval.figures import case_figure, summary_figure

    from patchddm_fast.core.safe_paths import check_case_id, confined, output_folder

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
    result = evaluate_folders(Path(args.pred), Path(args.gt), labels=args.labels, layout=args.layout,
                              lesion_wise=args.lesion_wise)
    out = Path(args.out)
    folder = None
    if args.figures is not None:
        folder = Path(args.figures) if args.figures else out.with_name(out.stem + "_figures")
    check_metrics_targets(result, out, args.overwrite, folder)
    json_path, csv_path = write_metrics(result, out)
    if "uncertainty" in result:
        from patchddm_fast.eval.figures import uncertainty_figure

        unc_cases = [dict(r["uncertainty"], case=r["case"]) for r in result["cases"] if "uncertainty" in r]
        uncertainty_figure(unc_cases, json_path.with_name(json_path.stem + "_uncertainty.png"),
                           title="variance vs errors, calibration of the probability map")
    if folder is not None:
        write_figures(result, Path(args.pred), Path(args.gt), folder, args.layout)
    if not args.quiet:
        print(format_summary(result))
        if "uncertainty" in result:
            u = result["uncertainty"]
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
            print(f"uncertainty ({u['n_cases']} cases with prob/var maps): mean AUROC of variance for errors "
                  f"{fmt(u['auroc_var_error'])}, mean ECE {fmt(u['ece'])}")
        if result["missing_predictions"]:
            print(f"warning: {len(result['missing_predictions'])} ground-truth case(s) have no prediction, e.g. "
                  f"{result['missing_predictions'][:3]}", file=sys.stderr)
        print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
    return 0
