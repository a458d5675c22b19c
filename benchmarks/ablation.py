"""The paper's ablation at demo scale: does PatchDDM's position encoding matter?

Trains three models on the same phantoms with the demo recipe and the same compute budget
(the same number of voxels through the network: FullRes, which trains on whole volumes,
gets ``steps * (patch / size)**3`` steps), then scores the held-out cases with the same
ensemble sampler:

* ``patchddm``  -- coordinate-encoded patches (the method),
* ``patches``   -- the same patches without the coordinate channels,
* ``fullres``   -- whole volumes (no patches, no coordinates needed).

The phantoms' periventricular decoy has the tumour edema's intensities in every channel
and differs from edema only by where it is (``patchddm_fast.data.phantom``), so the
false-positive volume on the decoy shows whether position was learned.

    python benchmarks/ablation.py --out benchmarks/results/ablation_runs --seeds 0
    # quick smoke version: --steps 200 --cases 2 --ensemble 2

Writes ``benchmarks/results/ablation.json`` and ``ablation.md`` (or ``--results DIR``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any, Dict, List

import nibabel as nib
import numpy as np
import torch

from patchddm_fast.cli.demo import DEMO_CONFIG, train_and_evaluate
from patchddm_fast.data.phantom import make_phantom_dataset
from patchddm_fast.training.sources import VALIDATION_SEED_OFFSET

VARIANTS = ("patchddm", "patches", "fullres")


def variant_config(method: str, steps: int, seed: int, cases: int) -> Dict[str, Any]:
    """The demo recipe for ``method`` at an equal voxel budget (see the module docstring)."""
    cfg = dict(DEMO_CONFIG, method=method, seed=seed, phantom_val=cases, device="cpu")
    if method == "fullres":
        ratio = (DEMO_CONFIG["patch_size"] / DEMO_CONFIG["phantom_size"]) ** 3
        cfg["steps"] = max(1, round(steps * ratio))
        cfg["warmup_steps"] = max(1, round(DEMO_CONFIG["warmup_steps"] * ratio))
        cfg["ckpt_every"] = max(1, round(DEMO_CONFIG["ckpt_every"] * ratio))
    else:
        cfg["steps"] = steps
    return cfg


def decoy_scores(metrics: Dict[str, Any], folder: Path, config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per case: voxels predicted on the decoy, false positives elsewhere, from the written masks."""
    phantoms = make_phantom_dataset(config["phantom_val"], config["phantom_size"],
                                    config["seed"] + VALIDATION_SEED_OFFSET, **config.get("phantom_options", {}))
    out = []
    for rec, ph in zip(metrics["cases"], phantoms):
        assert rec["case"] == ph.case_id, (rec["case"], ph.case_id)
        seg = np.asarray(nib.load(str(folder / f"{ph.case_id}_seg.nii.gz")).dataobj) > 0
        out.append(dict(rec, decoy_voxels=int(ph.decoy_mask.sum()), decoy_fp=int((seg & ph.decoy_mask).sum()),
                        other_fp=int((seg & ~ph.label & ~ph.decoy_mask).sum()),
                        fn=int((~seg & ph.label).sum())))
    return out


def markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"Ablation at demo scale ({meta['date']}, `{meta['command']}`)", "",
             "| method | seed | steps | ensemble Dice | 1-sample Dice | decoy FP voxels (of decoy) | other FP voxels | "
             "train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['steps']} | {r['dice']:.3f} | {r['dice_single_sample']:.3f} | "
                     f"{r['decoy_fp']} ({r['decoy_voxels']}) | {r['other_fp']} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs (checkpoints, NIfTI, montages)")
    p.add_argument("--results", default=str(Path(__file__).parent / "results"), help="where ablation.json/.md go")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=DEMO_CONFIG["steps"], help="PatchDDM training steps (the budget)")
    p.add_argument("--cases", type=int, default=DEMO_CONFIG["phantom_val"], help="held-out cases")
    p.add_argument("--ensemble", type=int, default=5)
    p.add_argument("--sampling-steps", type=int, default=10)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            cfg = variant_config(method, args.steps, seed, args.cases)
            folder = Path(args.out) / f"{method}_seed{seed}"
            m = train_and_evaluate(cfg, folder, ensemble=args.ensemble, sampling_steps=args.sampling_steps,
                                   sampling_seed=seed, progress=not args.quiet)
            cases = decoy_scores(m, folder, cfg)
            row = dict(method=method, seed=seed, steps=cfg["steps"], dice=m["mean"]["dice"],
                       dice_single_sample=m["mean"]["dice_single_sample"],
                       decoy_fp=sum(c["decoy_fp"] for c in cases), decoy_voxels=sum(c["decoy_voxels"] for c in cases),
                       other_fp=sum(c["other_fp"] for c in cases), train_s=m["timing_s"]["train"], cases=cases)
            rows.append(row)
            if not args.quiet:
                print(json.dumps({k: v for k, v in row.items() if k != "cases"}))
    meta = dict(date=datetime.date.today().isoformat(), command="python benchmarks/ablation.py " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]), torch=torch.__version__,
        threads=torch.get_num_threads(), machine=platform.machine(), demo_config=DEMO_CONFIG)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    (results / "ablation.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
