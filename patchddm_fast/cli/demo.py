"""``patchddm demo``: the whole method end to end on built-in phantoms, on a CPU, in minutes.

Trains a small PatchDDM (the paper's architecture, narrower and with fewer levels) on
coordinate-encoded patches of synthetic BraTS-like volumes, then samples whole held-out
volumes with a DDIM ensemble and writes metrics.json, NIfTI files and PNG montages.

Two departures from the paper's recipe make a CPU budget of minutes enough, both measured
(BENCHMARKS.md): the network predicts v instead of eps, and the learning rate follows a
cosine decay.  With the paper's eps-prediction the same 2,500 steps reach an ensemble Dice
near 0: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) amplifies a briefly trained network's
error up to 156x at high noise levels, so every DDIM trajectory starts from noise.

``--target regions`` trains the WT/TC/ET region model instead and scores every region,
lesion-wise too; its phantoms include multifocal cases (2-3 separate lesions).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from patchddm_fast.cli.sample import add_sampling_flags
from patchddm_fast.training.config import PAPER_DIFFUSION
from patchddm_fast.data.regions import TARGETS
from patchddm_fast.data.patches import OFFSET_DISTRIBUTIONS
from patchddm_fast.core.validation import float_in, int_at_least

DEMO_CONFIG = dict(
    method="patchddm",
    ops="fused",  # our custom ops (C++ GroupNorm-SiLU, oneDNN convolutions on CPU): ~6x faster per step
    diffusion=dict(PAPER_DIFFUSION, prediction="v"),
    model=dict(base_width=16, channel_mult=(1, 2, 2, 4), enc_blocks=1, dec_blocks=2, mid_blocks=1, groups=8),
    phantom_size=64,
    phantom_train=24,
    phantom_val=4,
    patch_size=32,
    patch_distribution="trapezoid",
    steps=2500,
    lr=1e-3,
    lr_schedule="cosine",
    warmup_steps=50,
    ckpt_every=250,
    log_every=25,
    val_every=0,
    val_steps=10,
    seed=0,
)

REGION_DEMO_MULTIFOCAL = 0.5  # fraction of the region demo's phantoms with 2-3 separate lesions


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="train and sample a small PatchDDM on built-in phantoms (no data needed, CPU)",
        description="Train a small PatchDDM on synthetic BraTS-like phantoms, then segment held-out whole "
        "volumes with a DDIM ensemble. Writes DIR/metrics.json, NIfTI files (image, ground truth, ensemble "
        "mean and variance, mask) and PNG montages. Re-running with the same --out resumes training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--steps", type=int_at_least(1), default=DEMO_CONFIG["steps"], help="training steps")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of data, weights and sampling")
    p.add_argument("--cases", type=int_at_least(1), default=DEMO_CONFIG["phantom_val"], help="held-out cases to sample")
    p.add_argument("--target", default="binary", choices=TARGETS,
                   help="binary: whole tumour (the paper's); regions: WT/TC/ET as three channels, scored per region "
                        "and lesion-wise (BraTS 2023)")
    p.add_argument("--patch-distribution", default=DEMO_CONFIG["patch_distribution"], choices=OFFSET_DISTRIBUTIONS,
                   help="training patch offsets per axis (trapezoid: the paper's, favours central patches)")
    p.add_argument("--ema-decay", type=float_in(0.0, 0.999999), default=None, metavar="DECAY",
                   help="sample with an exponential moving average of the weights (e.g. 0.995); off by default")
    add_sampling_flags(p)
    p.set_defaults(ensemble=5, sampling_steps=10)
    return p


def train_and_evaluate(config: dict, out: Path, *, ensemble: int, sampling_steps: int, sampling_seed: int,
                       progress: bool = True, memory_budget=None, eta: float = 0.0, threshold: float = 0.5,
                       sampler: str = "ddim", member_batch=None, fill_holes: bool = True) -> dict:
    """Train on ``config``'s phantoms (resuming from ``out/run``) and score its held-out cases with
    an ensemble; returns the metrics (also written to ``out/metrics.json``) with timings.

    The one training-and-scoring path of the demo and of ``benchmarks/ablation.py``."""
    from patchddm_fast.cli.showcase import evaluate_cases
    from patchddm_fast.training.config import TrainConfig
    from patchddm_fast.core.files import atomic_write_text
    from patchddm_fast.training.checkpoint import data_multiple
    from patchddm_fast.training.sources import load_cases
    from patchddm_fast.training.trainer import Trainer

    out = Path(out)
    config = dict(config, out_dir=str(out / "run"), progress=progress)
    t0 = time.perf_counter()
    resolved = TrainConfig.from_dict(config)
    train_cases, val_cases = load_cases(resolved, data_multiple(resolved.to_dict()))
    # The held-out cases are scored once, below, with the ensemble (not also by fit's validation).
    trainer = Trainer(config, train_cases=train_cases, val_cases=[])
    trainer.fit()
    train_s = time.perf_counter() - t0
    metrics = evaluate_cases(trainer.inference_model, trainer.diffusion, trainer.config.method, val_cases, out,
                             ensemble=ensemble, steps=sampling_steps, seed=sampling_seed, progress=progress,
                             memory_budget=memory_budget, eta=eta, threshold=threshold, sampler=sampler,
                             member_batch=member_batch, convention=trainer.config.label_convention,
                             fill_holes=fill_holes)
    metrics["trained_steps"] = trainer.step
    metrics["timing_s"] = dict(train=round(train_s, 1), total=round(time.perf_counter() - t0, 1))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.cli.sample import planner_advice_on_oom
    from patchddm_fast.cli.showcase import format_table

    out = Path(args.out)
    config = dict(DEMO_CONFIG, steps=args.steps, seed=args.seed, phantom_val=args.cases, device="cpu",
                  target=args.target, ema_decay=getattr(args, "ema_decay", None),
                  patch_distribution=getattr(args, "patch_distribution", DEMO_CONFIG["patch_distribution"]))
    if args.target == "regions":  # multifocal cases (2-3 separate lesions), so lesion-wise scores mean something
        config["phantom_options"] = dict(multifocal=REGION_DEMO_MULTIFOCAL)
    with planner_advice_on_oom(config["method"], "train"):
        metrics = train_and_evaluate(config, out, ensemble=args.ensemble, sampling_steps=args.sampling_steps,
                                     sampling_seed=args.seed, progress=not args.quiet,
                                     memory_budget=args.memory_budget, eta=args.eta, threshold=args.threshold,
                                     sampler=args.sampler, member_batch=args.member_batch,
                                     fill_holes=args.fill_holes)
    print(format_table(metrics))
    print(f"trained {metrics['trained_steps']} steps in {metrics['timing_s']['train']:.0f} s; total "
          f"{metrics['timing_s']['total']:.0f} s; results in {out}/ (metrics.json, *_montage.png, *.nii.gz)")
    return 0
