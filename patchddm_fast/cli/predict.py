"""``patchddm predict``: segment NIfTI cases with a checkpoint, outputs on the input's own grid.

For every case it writes into ``--out``:

* ``<case>_seg.nii.gz``  -- uint8 mask (ensemble mean > threshold),
* ``<case>_prob.nii.gz`` -- float32 ensemble mean,
* ``<case>_var.nii.gz``  -- float32 ensemble variance (uncertainty),

or, for a region model (``--target regions``), ``<case>_seg.nii.gz`` as one label map in the
training data's convention (BraTS 2020 0/1/2/4 or 2023 0/1/2/3, stored in the checkpoint;
ET ⊂ TC ⊂ WT enforced, see :mod:`patchddm_fast.data.regions`) and ``_prob_{WT,TC,ET}`` /
``_var_{WT,TC,ET}`` per region,

all on the ORIGINAL voxel grid with the first modality's header (affine, qform/sform and
their codes, zooms, units), so they overlay the scan in any viewer; plus ``predict.json``
(settings, preprocessing, timing and the crop/pad box of every case).  The preprocessing
is the one stored in the checkpoint (``config["preprocess"]``), so prediction sees exactly
what training saw.  It refuses to write into an input folder and never overwrites an
input file; existing outputs are replaced only with ``--overwrite``.

Under torchrun (``torchrun --nproc_per_node N -m patchddm_fast predict ...``) the cases are
sharded over the ranks (round robin; each rank writes its own cases' files, identical to a
single process's) and rank 0 writes ``predict.json`` for all of them.  With fewer cases than
ranks, each case's ensemble is spread over the ranks instead and its mean and variance are
reduced across them in float64 (:func:`patchddm_fast.training.distributed.reduce_ensemble`); those
agree with a single process's float32 statistics to float32 rounding.
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
REGION_OUTPUT_SUFFIXES = ("_seg",) + tuple(f"_{kind}_{name}" for kind in ("prob", "var") for name in ("WT", "TC", "ET"))


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.cli.sample import add_fill_holes_flag, add_memory_budget_flag, add_sampler_flags
    from patchddm_fast.core.validation import float_in, int_at_least
    from patchddm_fast.data.layouts import LAYOUTS

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
    p.add_argument("--ensemble", type=int_at_least(1), default=5,
                   help="samples per case; mean = prediction, variance = uncertainty")
    p.add_argument("--steps", "--sampling-steps", dest="steps", type=int_at_least(1), default=20,
                   help="DDIM steps per sample (about 20 match 1000)")
    p.add_argument("--seed", "--sampling-seed", dest="seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--threshold", type=float_in(0.0, 1.0), default=0.5, help="mask = ensemble mean > threshold")
    add_fill_holes_flag(p)
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
    add_sampler_flags(p)
    add_memory_budget_flag(p)
    return p


def resolve_inputs(inputs: Sequence[str], *, layout: str = "auto", case_id: Optional[str] = None,
                   cases: Optional[Sequence[str]] = None, already_normalised: bool = False):
    """(cases, input folders, already_normalised) for --input: one folder, or image files of one case."""
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.layouts import case_from_files, open_dataset

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


def check_output_folder(out: Path, input_folders, cases, overwrite: bool, figures: bool = False) -> None:
    """Refuse an input folder (or the folder holding input case folders, e.g. the dataset
    root, where stray outputs would break layout detection) as output, case ids that are
    not plain names, any output that would land outside ``out`` or on an input file, and
    existing outputs unless ``overwrite`` (all on resolved paths)."""
    from patchddm_fast.core.errors import DatasetError
    from patchddm_fast.data.layouts import PREDICTION_MARKER
    from patchddm_fast.core.safe_paths import check_case_id, check_targets, confined

    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: --out must be a folder, but a file of that name exists")
    out_r = out.resolve()
    for folder in input_folders:
        if Path(folder).resolve() == out_r:
            raise DatasetError(f"{out}: refusing to write predictions into the input folder {folder}; choose another --out")
    for folder in input_folders:
        folder_r = Path(folder).resolve()
        if folder_r.parent == out_r and any(Path(f).resolve().parent == folder_r for c in cases for f in c.files):
            raise DatasetError(f"{out}: refusing to write predictions into the folder that holds the input case "
                               f"folder {folder} (a dataset root would no longer open); choose another --out")
    targets = [confined(out, PREDICTION_MARKER)]
    for c in cases:
        check_case_id(c.case_id)
        suffixes = sorted(set(OUTPUT_SUFFIXES) | set(REGION_OUTPUT_SUFFIXES))
        names = [f"{c.case_id}{suffix}.nii.gz" for suffix in suffixes]
        targets += [confined(out, name) for name in names + ([f"{c.case_id}_prediction.png"] if figures else [])]
    check_targets(targets, overwrite=overwrite, inputs=[f for c in cases for f in c.files], folder=out)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def predict_case(model, diffusion, method: str, case, out_dir: Path, pre, *, ensemble: int, steps: int, seed: int,
                 threshold: float = 0.5, already_normalised: bool = False, image_channels: int = 4,
                 device: str = "cpu", progress: bool = True, figures: bool = False,
                 segment_fn: Optional[Callable] = None, memory_budget: Optional[str] = None,
                 write: bool = True, sampler: str = "ddim", member_batch: Optional[int] = None,
                 convention: Optional[str] = None, fill_holes: bool = True) -> Dict[str, Any]:
    """Preprocess one case, segment it, and write seg/prob/var on the original grid; returns a record.

    ``write=False``: segment only (a non-zero rank helping with a sharded ensemble).  A region
    model's result (3 channels) is written as a label map in ``convention`` plus per-region
    probability and variance maps."""
    import torch

    from patchddm_fast.data.nifti import save_like
    from patchddm_fast.data.preprocess import preprocess_case
    from patchddm_fast.data.volumes import load_case

    if segment_fn is None:
        from patchddm_fast.sampling.segment import segment_volume as segment_fn
    from patchddm_fast.analysis.planner import plan_sampling
    start = time.perf_counter()
    loaded = load_case(case, load_label=False, expect_channels=image_channels)
    prep = preprocess_case(loaded, pre, already_normalised)
    image = torch.from_numpy(prep.image).to(device)
    # With --memory-budget the planner picks how this case's grid is sampled (members per batch too).
    plan = (plan_sampling(model, memory_budget, method, image.shape, ensemble if member_batch is None else 1)
            if memory_budget else None)
    res = segment_fn(model, diffusion, image, method=method, ensemble=ensemble, steps=steps, seed=seed,
                     threshold=threshold, progress=progress, desc=case.case_id,
                     **({"plan": plan} if plan is not None else {}),
                     **({"sampler": sampler} if sampler != "ddim" else {}),
                     **({"member_batch": member_batch} if member_batch is not None else {}),
                     **({"fill_holes": False} if not fill_holes else {}))
    if not write:
        return dict(case=case.case_id, seconds=round(time.perf_counter() - start, 3))
    box = prep.box
    # The ensemble mean of the final samples lies in about [-1.03, 1.03] (x0 clamped to [-1, 1]
    # plus the last step's noise); as a foreground probability it is clipped to [0, 1].
    mean_all = np.clip(res.mean.detach().float().cpu().numpy(), 0.0, 1.0)
    var_all = res.var.detach().float().cpu().numpy()
    if res.mask.dim() == 4:  # WT/TC/ET regions
        from patchddm_fast.data.regions import REGION_NAMES, label_map

        mask = box.invert(label_map(res.mask.detach().cpu().numpy(), convention or "brats2020"))
        writes = [("_seg", mask, np.uint8, f"labels ({convention or 'brats2020'})")]
        for i, name in enumerate(REGION_NAMES):
            writes += [(f"_prob_{name}", box.invert(mean_all[i]), np.float32, f"{name} ensemble mean"),
                       (f"_var_{name}", box.invert(var_all[i]), np.float32, f"{name} ensemble variance")]
        mean, var = writes[1][1], writes[2][1]  # the whole tumour's, for the figure
    else:
        mean, var = box.invert(mean_all), box.invert(var_all)
        mask = box.invert(res.mask.detach().cpu().numpy().astype(np.uint8))
        writes = [("_seg", mask, np.uint8, "mask"), ("_prob", mean, np.float32, "ensemble mean"),
                  ("_var", var, np.float32, "ensemble variance")]
    outputs = {}
    for suffix, data, dtype, what in writes:
        path = out_dir / f"{case.case_id}{suffix}.nii.gz"
        save_like(data, loaded.reference, path, dtype, description=f"patchddm_fast {what}")
        outputs[suffix.lstrip("_")] = str(path)
    if figures:
        from patchddm_fast.eval.figures import case_figure

        flair = loaded.image[min(3, loaded.image.shape[0] - 1)]
        t1ce = loaded.image[1] if loaded.image.shape[0] >= 4 else None  # channels t1, t1ce, t2, flair
        case_figure(flair, None, mean, var, out_dir / f"{case.case_id}_prediction.png",
                    title=f"{case.case_id} (ensemble {ensemble}, {sampler} {steps} steps)", spacing=loaded.zooms,
                    second=t1ce, second_name="T1ce")
    return dict(case=case.case_id, inputs=[str(f) for f in case.images], outputs=outputs, box=box.to_dict(),
                shape=list(mask.shape), zooms=list(loaded.zooms), predicted_voxels=int((mask > 0).sum()),
                seconds=round(time.perf_counter() - start, 3))


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.training import distributed

    if args.ensemble < 1 or args.steps < 1:
        raise ValueError(f"--ensemble and --steps must be >= 1 (got {args.ensemble}, {args.steps})")
    ctx, torch_device = distributed.init(args.device)
    try:
        return _run(args, ctx, str(torch_device))
    finally:
        distributed.shutdown(ctx)


def _run(args: argparse.Namespace, ctx, device: str) -> int:
    from patchddm_fast.cli.sample import planner_advice_on_oom
    from patchddm_fast.training import distributed
    from patchddm_fast.core.files import atomic_write_text
    from patchddm_fast.training.checkpoint import load_for_inference
    from patchddm_fast.model.method import get_method
    from patchddm_fast.data.layouts import PREDICTION_MARKER
    from patchddm_fast.data.training_sets import preprocess_config_for
    from patchddm_fast.core.safe_paths import output_folder
    from patchddm_fast.sampling.segment import NonFiniteSampleError

    cases, folders, normalised = distributed.agree(
        lambda: resolve_inputs(args.input, layout=args.layout, case_id=args.case_id, cases=args.cases,
                               already_normalised=args.already_normalised), ctx)
    out = Path(args.out)
    # Every rank checks before any rank writes (a rank's fresh outputs would look like stale ones).
    distributed.agree(lambda: check_output_folder(out, folders, cases, args.overwrite, figures=args.figures), ctx)
    quiet = args.quiet or not ctx.is_main
    model, diffusion, cfg = load_for_inference(args.model, device=device)
    method = cfg["method"]
    multiple = get_method(method).size_multiple(int(getattr(model, "size_multiple", 1)))
    if not cfg.get("preprocess") and not quiet:
        print(f"patchddm predict: {args.model} stores no preprocessing parameters; using the defaults",
              file=sys.stderr)
    pre = preprocess_config_for(cfg.get("preprocess"), multiple)
    output_folder(out, "--out")
    records: List[Dict[str, Any]] = []
    summary = dict(model=str(args.model), method=method, target=cfg.get("target", "binary"),
                   label_convention=cfg.get("label_convention"), ensemble=args.ensemble, steps=args.steps, seed=args.seed,
                   sampler=args.sampler,
                   threshold=args.threshold, fill_holes=args.fill_holes, device=device, preprocess=pre.to_dict(),
                   already_normalised=normalised, cases=records)
    if ctx.enabled:
        summary["device"] = device.split(":")[0]  # the same on every rank's machine
        summary["world_size"] = ctx.world_size
    # Written first (and rewritten at the end) so a partly filled --out is already marked as predictions.
    if ctx.is_main:
        atomic_write_text(out / PREDICTION_MARKER, json.dumps(summary, indent=1))
    # Few cases, many ranks: every rank works on every case, each on its share of the ensemble.
    spread_ensemble = ctx.enabled and len(cases) < ctx.world_size
    mine = cases if (spread_ensemble or not ctx.enabled) else distributed.shard(cases, ctx)
    segment_fn = distributed.sharded_ensemble_segmenter(ctx) if spread_ensemble else None
    local: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, case in enumerate(mine, start=1):
        try:
            with planner_advice_on_oom(method, "sample"):
                rec = predict_case(model, diffusion, method, case, out, pre, ensemble=args.ensemble, steps=args.steps,
                                   seed=args.seed, threshold=args.threshold, already_normalised=normalised,
                                   image_channels=int(cfg.get("image_channels", 4)), device=device,
                                   progress=not quiet, figures=args.figures, memory_budget=args.memory_budget,
                                   segment_fn=segment_fn, write=ctx.is_main or not spread_ensemble,
                                   sampler=args.sampler, member_batch=args.member_batch,
                                   convention=cfg.get("label_convention"), fill_holes=args.fill_holes)
        except NonFiniteSampleError as exc:
            raise NonFiniteSampleError(f"{args.model}: {exc}") from None
        local.append(rec)
        if not args.quiet and (ctx.is_main or not spread_ensemble):
            elapsed = time.perf_counter() - t0
            eta = elapsed / i * (len(mine) - i)
            where = f"rank {ctx.rank}: " if ctx.enabled else ""
            print(f"{where}[{i}/{len(mine)}] {case.case_id}: {rec['seconds']:.1f}s, {rec['predicted_voxels']} voxels "
                  f"segmented; elapsed {_fmt_seconds(elapsed)}, ETA {_fmt_seconds(eta)}", file=sys.stderr)
    if spread_ensemble or not ctx.enabled:
        records.extend(local)
    else:
        records.extend(distributed.gather_in_order(local, len(cases), ctx))
    if ctx.is_main:
        atomic_write_text(out / PREDICTION_MARKER, json.dumps(summary, indent=1))
    if not quiet:
        n_files = sum(len(r.get("outputs", {})) for r in records)
        print(f"wrote {n_files} NIfTI files for {len(records)} case(s) to {out}", file=sys.stderr)
    return 0
