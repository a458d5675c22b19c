"""Cheap diagnostics of a demo checkpoint: what does the network's x0 say about the decoy?

One network call per (case, t, window): x_t = q_sample(ground truth, t, noise), the
network's implied x0 thresholded at 0.5, on the run's held-out phantoms.  Reports the
fraction of decoy voxels predicted as tumour and the x0 Dice, for the whole volume and for
centred crops (which keep the whole volume's coordinates), so one can tell "the network has
not learned the decoy" from "the whole-volume pass differs from the patches it trained on"
(GroupNorm statistics over more air).  NOTES_demo.md / BENCHMARKS §1 used it on checkpoints
at steps 500 and 1,000.

    python benchmarks/demo_diagnostics.py DEMO_OUT/run/last.pt [--t 999 600] [--large-necrosis]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from patchddm_fast.training.checkpoint import load_for_inference
from patchddm_fast.model.conditioning import condition, network_input
from patchddm_fast.data.phantom import LARGE_NECROSIS, make_phantom_dataset
from patchddm_fast.training.sources import VALIDATION_SEED_OFFSET
from patchddm_fast.eval.metrics import dice


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--t", type=int, nargs="+", default=[999, 600])
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--crops", type=int, nargs="+", default=[40, 48], help="centred window sizes besides the whole volume")
    p.add_argument("--large-necrosis", action="store_true", help="score LARGE_NECROSIS phantoms (necrosis recall)")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    model, diffusion, cfg = load_for_inference(args.checkpoint)
    if cfg["method"] != "patchddm":
        raise SystemExit(f"{args.checkpoint}: method {cfg['method']!r}; this diagnostic is for patchddm runs")
    size = cfg["phantom_size"]
    opts = dict(cfg.get("phantom_options") or {}, **(LARGE_NECROSIS if args.large_necrosis else {}))
    cases = make_phantom_dataset(args.cases, size, cfg["seed"] + VALIDATION_SEED_OFFSET, **opts)
    windows = [(s, (size - s) // 2) for s in args.crops if s < size] + [(size, 0)]
    rows = {}
    with torch.no_grad():
        for case in cases:
            image = torch.from_numpy(case.image)
            gt = torch.from_numpy(case.label.astype(np.float32))[None, None]
            for t in args.t:
                tt = torch.tensor([t])
                x_t = diffusion.q_sample(gt, tt, torch.randn(gt.shape, generator=torch.Generator().manual_seed(t)))
                for s, o in windows:
                    w = tuple(slice(o, o + s) for _ in range(3))
                    cond = condition(image[(slice(None),) + w], "patchddm", (size,) * 3, (o,) * 3)[None]
                    x = x_t[(slice(None), slice(None)) + w]
                    pred = diffusion.x0_from_output(x, tt, model(network_input(cond, x), tt))[0, 0].numpy() > 0.5
                    nec = case.labels[w] == 1
                    rows.setdefault((s, t), []).append((
                        pred[case.decoy_mask[w]].mean(), dice(pred, case.label[w]),
                        pred[nec].mean() if nec.any() else np.nan,
                        float((image[(slice(None),) + w] == 0).all(0).float().mean())))
    out = []
    for (s, t), vals in sorted(rows.items()):
        a = np.nanmean(np.array(vals, dtype=float), 0)
        out.append(dict(window=s, t=t, decoy_fp=round(a[0], 3), x0_dice=round(a[1], 3),
                        necrosis_recall=None if np.isnan(a[2]) else round(a[2], 3), air=round(a[3], 2)))
        print(json.dumps(out[-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
