"""Issue 13.1: why does the predicted whole tumour lose its necrotic core?

Trains the demo network with the demo recipe at the hole test's reduced scale (32^3
phantoms, 16^3 patches, 600 steps, 16 training phantoms, one thread; as
``tests/test_necrotic_core.py``) on training phantoms whose necrotic core looks

* ``default``: the phantoms' usual core (dark on T1/T1ce, bright on T2, mid-grey on FLAIR),
* ``csf``: like CSF in all four channels, FLAIR-dark included (``necrosis_look="csf"``),
* ``mixed``: odd cases ``csf``, every fourth case with a large core,

then segments 4 held-out phantoms with a large core (``LARGE_NECROSIS``) in each look
(ensemble 3 x 10 DDIM steps, threshold 0.5) and reports per case: Dice without and with
the hole filling of ``tumour_mask``, enclosed holes of the unfilled mask, necrotic voxels
outside the unfilled mask, and the ensemble mean's average over the necrotic core.

    OMP_NUM_THREADS=1 python benchmarks/necrotic_core_look.py --train-look default
    # ... --train-look csf, --train-look mixed; each about 5-7 min on one thread
    python benchmarks/necrotic_core_look.py --table RESULTS/necrotic_core_look_*.json

Writes ``benchmarks/results/necrotic_core_look_<look>.json`` (``--results DIR``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from patchddm_fast.cli.demo import DEMO_CONFIG
from patchddm_fast.data.phantom import LARGE_NECROSIS, NECROSIS_LOOKS, case_seed, make_phantom, make_phantom_dataset
from patchddm_fast.data.regions import fill_enclosed_holes, tumour_mask
from patchddm_fast.eval.metrics import dice
from patchddm_fast.sampling.segment import segment_volume
from patchddm_fast.training.cases import pad_case
from patchddm_fast.training.trainer import Trainer

SIZE = 32
TRAIN_CASES = 16
HELD_OUT_SEED = 777  # the hole test's held-out seed


def training_cases(look: str) -> list:
    cases = []
    for i in range(TRAIN_CASES):
        case_look = look if look != "mixed" else ("csf" if i % 2 else "default")
        options = dict(LARGE_NECROSIS) if look == "mixed" and i % 4 == 1 else {}
        c = make_phantom(SIZE, case_seed(0, i), f"phantom_{i:03d}", necrosis_look=case_look, **options)
        cases.append(pad_case(c.case_id, c.image, c.label, 8))
    return cases


def run(look: str, steps: int) -> Dict[str, Any]:
    torch.set_num_threads(1)  # fixed rounding, as the hole test
    with tempfile.TemporaryDirectory() as out:
        cfg = dict(DEMO_CONFIG, phantom_size=SIZE, patch_size=SIZE // 2, steps=steps, ckpt_every=0, log_every=0,
                   out_dir=out, progress=False, device="cpu", resume=False, seed=0)
        started = time.time()
        trainer = Trainer(cfg, train_cases=training_cases(look), val_cases=[])
        trainer.fit()
        result: Dict[str, Any] = dict(train_look=look, steps=steps, train_s=round(time.time() - started))
        for test_look in NECROSIS_LOOKS:
            rows: List[Dict[str, Any]] = []
            for case in make_phantom_dataset(4, SIZE, HELD_OUT_SEED, necrosis_look=test_look, **LARGE_NECROSIS):
                res = segment_volume(trainer.model, trainer.diffusion, torch.from_numpy(case.image),
                                     method="patchddm", ensemble=3, steps=10, seed=0, progress=False)
                raw = tumour_mask(res.mean.numpy(), 0.5, fill_holes=False)
                necrosis = case.labels == 1
                rows.append(dict(case=case.case_id, dice=round(float(dice(raw, case.label)), 3),
                                 dice_filled=round(float(dice(res.mask.numpy(), case.label)), 3),
                                 holes=int((fill_enclosed_holes(raw) & ~raw).sum()),
                                 necrosis=int(necrosis.sum()), necrosis_missed=int((necrosis & ~raw).sum()),
                                 necrosis_mean=round(float(res.mean.numpy()[necrosis].mean()), 3)))
            result[test_look] = rows
    return result


def table(results: List[Dict[str, Any]]) -> str:
    lines = ["| trained on | held-out core look | Dice (4 cases) | Dice, holes filled | enclosed holes | "
             "necrotic voxels missed | mean prob. in core |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for look in NECROSIS_LOOKS:
            rows = r[look]

            def column(key: str, fmt: str) -> str:
                return " / ".join(format(x[key], fmt) for x in rows)

            missed = f"{sum(x['necrosis_missed'] for x in rows)} of {sum(x['necrosis'] for x in rows)}"
            lines.append(f"| {r['train_look']} | {look} | {column('dice', '.3f')} | {column('dice_filled', '.3f')} | "
                         f"{column('holes', 'd')} | {missed} | {column('necrosis_mean', '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-look", choices=NECROSIS_LOOKS + ("mixed",))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of earlier results")
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return 0
    if not args.train_look:
        p.error("--train-look or --table is required")
    result = run(args.train_look, args.steps)
    path = Path(args.results) / f"necrotic_core_look_{args.train_look}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
