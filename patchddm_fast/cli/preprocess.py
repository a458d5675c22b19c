"""``patchddm preprocess``: validate a whole dataset and fill the volume cache before training.

Checks every file of every case (readable, 3D, finite, same grid across modalities and
label, allowed label values) and stops at the first bad one with an error naming it;
then normalises, pads and stores each case as memory-mapped arrays (see
:mod:`patchddm_fast.data.cache`).  Optionally writes the train/val/test split and measures
how many training patches per second the cache delivers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.data.layouts import LAYOUTS
    from patchddm_fast.data.preprocess import LABEL_MODES, PreprocessConfig
    from patchddm_fast.data.splits import SPLIT_NAMES
    from patchddm_fast.core.validation import int_at_least

    d = PreprocessConfig()
    p = sub.add_parser(
        "preprocess", help="validate a NIfTI dataset and cache its preprocessed volumes",
        description="Validate every case of a BraTS / nnU-Net / preprocessed dataset, normalise and pad it, and store "
        "it in a memory-mapped cache that training reads patches from.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $PATCHDDM_CACHE or ~/.cache/patchddm_fast/volumes)")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="dataset layout")
    p.add_argument("--lower", type=float, default=d.lower_percentile, help="lower clipping percentile (brain voxels)")
    p.add_argument("--upper", type=float, default=d.upper_percentile, help="upper clipping percentile (brain voxels)")
    p.add_argument("--multiple", type=int_at_least(1), default=d.multiple, help="pad/crop every axis to a multiple of this")
    p.add_argument("--no-cube", action="store_true", help="pad each axis separately instead of to a common cube")
    p.add_argument("--target-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="exact network grid (overrides --multiple/--no-cube)")
    p.add_argument("--label-mode", default=d.label_mode, choices=LABEL_MODES,
                   help="binary: whole tumour (label > 0); multiclass: keep label values")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="parallel preprocessing processes")
    p.add_argument("--split", default=None,
                   help=f"write a split: a name {SPLIT_NAMES}, 'random' (seeded), or an existing JSON file to check")
    p.add_argument("--split-out", default=None, metavar="JSON", help="where to write the split (default: print it)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random split")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction of a random split")
    p.add_argument("--test-fraction", type=float, default=0.1, help="test fraction of a random split")
    p.add_argument("--benchmark", type=int_at_least(0), default=0, metavar="N",
                   help="after caching, time N random training patches read through a DataLoader")
    p.add_argument("--patch-size", type=int_at_least(1), default=128, help="patch edge for --benchmark")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.data.cache import VolumeCache
    from patchddm_fast.data.layouts import open_dataset
    from patchddm_fast.data.preprocess import PreprocessConfig
    from patchddm_fast.data.splits import resolve_split

    cfg = PreprocessConfig(lower_percentile=args.lower, upper_percentile=args.upper, multiple=args.multiple,
                           cube=not args.no_cube, target_shape=tuple(args.target_shape) if args.target_shape else None,
                           label_mode=args.label_mode)
    if args.cache is not None:
        from patchddm_fast.core.safe_paths import output_folder

        output_folder(args.cache, "--cache")
    ds = open_dataset(args.data, layout=args.layout)
    print(f"{args.data}: layout {ds.layout}, {len(ds.cases)} case(s), channels {', '.join(ds.channel_names)}",
          file=sys.stderr)
    cache = VolumeCache(args.cache)
    start = time.perf_counter()
    vols = cache.build(ds, cfg, workers=args.workers, progress=not args.quiet)
    stored = sum(v.image.nbytes + (v.label.nbytes if v.label is not None else 0) for v in vols)
    shapes = sorted({v.box.original_shape for v in vols})
    print(f"cached {len(vols)} case(s) in {cache.directory} ({stored / 1e9:.2f} GB stored) in "
          f"{time.perf_counter() - start:.1f}s; original shapes {shapes[:3]}{' ...' if len(shapes) > 3 else ''}; "
          f"network grid {vols[0].shape}", file=sys.stderr)
    print(json.dumps({"preprocess": cfg.to_dict()}))
    if args.split is not None:
        split = resolve_split(args.split, ds.case_ids, seed=args.seed, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction)
        if args.split_out:
            split.save(args.split_out)
            print(f"split {len(split.train)}/{len(split.val)}/{len(split.test)} written to {args.split_out}",
                  file=sys.stderr)
        else:
            print(json.dumps(split.to_dict()))
    if args.benchmark > 0:
        from patchddm_fast.data.dataset import CachedVolumeDataset, measure_throughput

        stats = measure_throughput(CachedVolumeDataset(vols, patch_size=args.patch_size), args.benchmark)
        print(f"{stats['items_per_s']:.1f} patches/s of {args.patch_size}^3 ({stats['mb_per_s']:.0f} MB/s)",
              file=sys.stderr)
    return 0
