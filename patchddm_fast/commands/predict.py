"""``patchddm predict``: segment NIfTI cases with a checkpoint, outputs on the input's own grid.

For every case it writes into ``--out``:

* ``<case>_seg.nii.gz``  -- uint8 mask (ensemble mean > threshold),
* ``<case>_prob.nii.gz`` -- float32 ensemble mean,
* ``<case>_var.nii.gz``  -- float32 ensemble variance (uncertainty),

all on the ORIGINAL voxel grid with the first modality's header (affine, qform/sform and
their codes, zooms, units), so they overlay the scan in any viewer; plus ``predict.json``
(settings, preprocessing, timing and the crop/pad box of every case).  The preprocessing
is the one stored in the checkpoint (``config["preprocess"]``), so prediction sees exactly
what training saw.  It refuses to write into an input folder and never overwrites an
input file; existing outputs are replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

OUTPUT_SUFFIXES = ("_seg", "_prob", "_var")


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.commands.sample import add_memory_budget_flag
    from patchddm_fast.io.layouts import LAYOUTS

    p = sub.add_parser(
        "predict", help="segment NIfTI cases (case folder, dataset folder or files) with a checkpoint",
        description="Segment multi-modal NIfTI cases with a trained checkpoint and write <case>_seg/_prob/_var.nii.gz "
        "on the input's original grid and header.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint written by `patchddm train`")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="a case folder, a dataset folder (BraTS / nnU-Net / preprocessed), or the image files of one "
                        "case in channel order t1 t1ce t2 flair")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not be an input folder)")
    p.add_argument("--ensemble", type=int, default=5, help="samples per case; mean = prediction, variance = uncertainty")
    p.add_argument("--steps", "--sampling-steps", dest="steps", type=int, default=20,
                   help="DDIM steps per sample (about 20 match 1000)")
    p.add_argument("--seed", "--sampling-seed", dest="seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--threshold", type=float, default=0.5, help="mask = ensemble mean > threshold")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="dataset layout of a folder input")
    p.add_argument("--cases", nargs="+", default=None, metavar="ID", help="only these case ids of a dataset folder")
    p.add_argument("--case-id", default=None, help="case id for a list of files; their common name prefix when omitted")
    p.add_argument("--already-normalised", action="store_true",
                   help="file inputs are already in [0, 1]: skip clipping/min-max (automatic for the "
                        "patchddm-preprocessed layout)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out (never inputs)")
    p.add_argument("--figures", action="store_true", help="also write <case>_prediction.png (FLAIR, T1ce, mean, variance)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-case lines")
    add_memory_budget_flag(p)
    return p


def resolve_inputs(inputs: Sequence[str], *, layout: str = "auto", case_id: Optional[str] = None,
                   cases: Optional[Sequence[str]] = None, already_normalised: bool = False):
    """(cases, input folders, already_normalised) for --input: one folder, or image files of one case."""
    from patchddm_fast.io.errors import DatasetError
    from patchddm_fast.io.layouts import case_from_files, open_dataset

    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        ds = open_dataset(paths[0], layout=layout, require_labels=False)
        chosen = ds.cases
        if cases:
            unknown = sorted(set(cases) - set(ds.case_ids))
            if unknown:
                raise DatasetError(f"{paths[0]}: no case(s) {unknown}")
            chosen = [c for c in ds.cases if c.case_id in set(cases)]
        folders = {paths[0]} | {c.folder for c in chosen}
        return chosen, folders, ds.preprocessed or already_normalised
    dirs = [p for p in paths if p.is_dir()]
    if dirs:
        raise DatasetError(f"{dirs[0]}: pass either one folder or a list of image files, not both")
    case = case_from_files(paths, case_id=case_id)
    return [case], {p.parent for p in paths}, already_normalised


def check_output_folder(out: Path, input_folders, cases, overwrite: bool) -> None:
    """Refuse an input folder (or the folder holding input case folders, e.g. the dataset
    root, where stray outputs would break layout detection) as output, and existing
    outputs unless ``overwrite``."""
    from patchddm_fast.io.errors import DatasetError

    out_r = out.resolve()
    for folder in input_folders:
        if Path(folder).resolve() == out_r:
            raise DatasetError(f"{out}: refusing to write predictions into the input folder {folder}; choose another --out")
    for folder in input_folders:
        folder_r = Path(folder).resolve()
        if folder_r.parent == out_r and any(Path(f).resolve().parent == folder_r for c in cases for f in c.files):
            raise DatasetError(f"{out}: refusing to write predictions into the folder that holds the input case "
                               f"folder {folder} (a dataset root would no longer open); choose another --out")
    inputs = {Path(f).resolve() for c in cases for f in c.files}
    existing = []
    for c in cases:
        for suffix in OUTPUT_SUFFIXES:
            target = out / f"{c.case_id}{suffix}.nii.gz"
            if target.resolve() in inputs:
                raise DatasetError(f"{target}: refusing to overwrite an input file")
            if target.exists():
                existing.append(target.name)
    if existing and not overwrite:
        raise DatasetError(f"{out}: {len(existing)} output file(s) exist already (e.g. {existing[0]}); "
                           f"pass --overwrite to replace them")


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def predict_case(model, diffusion, method: str, case, out_dir: Path, pre, *, ensemble: int, steps: int, seed: int,
                 threshold: float = 0.5, already_normalised: bool = False, image_channels: int = 4,
                 device: str = "cpu", progress: bool = True, figures: bool = False,
                 segment_fn: Optional[Callable] = None, memory_budget: Optional[str] = None) -> Dict[str, Any]:
    """Preprocess one case, segment it, and write seg/prob/var on the original grid; returns a record."""
    import torch

    from patchddm_fast.io.nifti import save_like
    from patchddm_fast.io.preprocess import preprocess_case
    from patchddm_fast.io.volumes import load_case

    if segment_fn is None:
        from patchddm_fast.sampling import segment_volume as segment_fn
    start = time.perf_counter()
    loaded = load_case(case, load_label=False, expect_channels=image_channels)
    prep = preprocess_case(loaded, pre, already_normalised)
    image = torch.from_numpy(prep.image).to(device)
    res = segment_fn(model, diffusion, image, method=method, ensemble=ensemble, steps=steps, seed=seed,
                     threshold=threshold, progress=progress, desc=case.case_id,
                     **({"memory_budget": memory_budget} if memory_budget else {}))
    box = prep.box
    # The ensemble mean of the final samples lies in about [-1.03, 1.03] (x0 clamped to [-1, 1]
    # plus the last step's noise); as a foreground probability it is clipped to [0, 1].
    mean = box.invert(np.clip(res.mean.detach().float().cpu().numpy(), 0.0, 1.0))
    var = box.invert(res.var.detach().float().cpu().numpy())
    mask = box.invert(res.mask.detach().cpu().numpy().astype(np.uint8))
    outputs = {}
    for suffix, data, dtype, what in (("_seg", mask, np.uint8, "mask"), ("_prob", mean, np.float32, "ensemble mean"),
                                      ("_var", var, np.float32, "ensemble variance")):
        path = out_dir / f"{case.case_id}{suffix}.nii.gz"
        save_like(data, loaded.reference, path, dtype, description=f"patchddm_fast {what}")
        outputs[suffix.lstrip("_")] = str(path)
    if figures:
        from patchddm_fast.report import case_figure

        flair = loaded.image[min(3, loaded.image.shape[0] - 1)]
        t1ce = loaded.image[1] if loaded.image.shape[0] >= 4 else None  # channels t1, t1ce, t2, flair
        case_figure(flair, None, mean, var, out_dir / f"{case.case_id}_prediction.png",
                    title=f"{case.case_id} (ensemble {ensemble}, {steps} steps)", spacing=loaded.zooms,
                    second=t1ce, second_name="T1ce")
    return dict(case=case.case_id, inputs=[str(f) for f in case.images], outputs=outputs, box=box.to_dict(),
                shape=list(mask.shape), zooms=list(loaded.zooms), predicted_voxels=int(mask.sum()),
                seconds=round(time.perf_counter() - start, 3))


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.checkpoint import load_for_inference
    from patchddm_fast.io.training import preprocess_config_for

    if args.ensemble < 1 or args.steps < 1:
        raise ValueError(f"--ensemble and --steps must be >= 1 (got {args.ensemble}, {args.steps})")
    cases, folders, normalised = resolve_inputs(args.input, layout=args.layout, case_id=args.case_id,
                                                cases=args.cases, already_normalised=args.already_normalised)
    out = Path(args.out)
    check_output_folder(out, folders, cases, args.overwrite)
    device = _pick_device(args.device)
    model, diffusion, cfg = load_for_inference(args.model, device=device)
    method = cfg["method"]
    multiple = int(getattr(model, "size_multiple", 1)) * (2 if method == "halfres" else 1)
    if not cfg.get("preprocess") and not args.quiet:
        print(f"patchddm predict: {args.model} stores no preprocessing parameters; using the defaults",
              file=sys.stderr)
    pre = preprocess_config_for(cfg.get("preprocess"), multiple)
    out.mkdir(parents=True, exist_ok=True)
    records: List[Dict[str, Any]] = []
    summary = dict(model=str(args.model), method=method, ensemble=args.ensemble, steps=args.steps, seed=args.seed,
                   threshold=args.threshold, device=device, preprocess=pre.to_dict(),
                   already_normalised=normalised, cases=records)
    # Written first (and rewritten at the end) so a partly filled --out is already marked as predictions.
    (out / "predict.json").write_text(json.dumps(summary, indent=1))
    t0 = time.perf_counter()
    for i, case in enumerate(cases, start=1):
        rec = predict_case(model, diffusion, method, case, out, pre, ensemble=args.ensemble, steps=args.steps,
                           seed=args.seed, threshold=args.threshold, already_normalised=normalised,
                           image_channels=int(cfg.get("image_channels", 4)), device=device,
                           progress=not args.quiet, figures=args.figures, memory_budget=args.memory_budget)
        records.append(rec)
        if not args.quiet:
            elapsed = time.perf_counter() - t0
            eta = elapsed / i * (len(cases) - i)
            print(f"[{i}/{len(cases)}] {case.case_id}: {rec['seconds']:.1f}s, {rec['predicted_voxels']} voxels "
                  f"segmented; elapsed {_fmt_seconds(elapsed)}, ETA {_fmt_seconds(eta)}", file=sys.stderr)
    (out / "predict.json").write_text(json.dumps(summary, indent=1))
    if not args.quiet:
        print(f"wrote {3 * len(records)} NIfTI files for {len(records)} case(s) to {out}", file=sys.stderr)
    return 0
