"""``patchddm memory``: simulated GPU memory of a training step or of the sampler."""
from __future__ import annotations

import argparse
import json


def simulated_methods() -> tuple:
    """The methods the simulator knows the paper's sizes for (the --method choices)."""
    from patchddm_fast.analysis.simulate import PAPER_SIZES
    from patchddm_fast.model.method import METHODS

    return tuple(m for m in METHODS if (m, "train") in PAPER_SIZES)


def add_memory_flags(p: argparse.ArgumentParser, recipe: bool = True) -> None:
    """Flags shared by `memory` and `profile`: what to run and with which engine settings."""
    from patchddm_fast.analysis.simulate import MODES, RECIPES
    from patchddm_fast.data.regions import TARGETS
    from patchddm_fast.model.backend import OPS_BACKENDS
    from patchddm_fast.model.execution.offload import OFFLOAD_MODES
    from patchddm_fast.model.execution.precision import PRECISIONS
    from patchddm_fast.model.unet import RECOMPUTE_MODES

    p.add_argument("--method", default="patchddm", choices=simulated_methods(),
                   help="the method: the paper's network and its input channels")
    p.add_argument("--mode", default="train", choices=MODES,
                   help="train: forward, backward and AdamW step; sample: the real sampler (segment_volume) for one "
                        "ensemble member (--batch members as one network batch), its own device tensors included")
    p.add_argument("--size", type=int, default=None,
                   help="edge of the cubic input in voxels (default: 128 for PatchDDM/HalfRes training and "
                        "HalfRes sampling, 256 otherwise); a multiple of 64")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--target", default="binary", choices=TARGETS,
                   help="binary: the paper's whole-tumour mask; regions: WT/TC/ET as three mask channels "
                        "(only the first and last convolutions grow)")
    if recipe:
        p.add_argument("--recipe", default="engine", choices=RECIPES,
                       help="engine: fused ops, bf16, checkpointing; paper: the reference code's settings")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="override the recipe's precision (auto = bf16 as on an Ampere+ GPU)")
    p.add_argument("--checkpoint", default=None, choices=RECOMPUTE_MODES,
                   help="override the recipe's activation checkpointing")
    p.add_argument("--offload", default=None, choices=OFFLOAD_MODES,
                   help="keep skips (skips) or skips and saved activations (all) in pinned host memory")
    p.add_argument("--tiled", action="store_true", default=None,
                   help="sampling: slab-wise low-memory executor (buffer reuse, streamed skips)")
    p.add_argument("--ops", default=None, choices=OPS_BACKENDS, help="override the recipe's ops backend")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "memory", help="simulate the GPU memory of training or sampling (no GPU needed)",
        description="Run the real training step (twice, so optimizer state exists) or the real sampler "
        "(segment_volume's device side: conditioning, noise, two DDIM steps) on fake tensors, track every "
        "allocation and report the live-tensor peak, the caching allocator's reserved peak plus the CUDA "
        "context (process_peak_bytes in --json), and where the bytes go.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_memory_flags(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def simulate_from_args(args: argparse.Namespace, recipe: str = None):
    from patchddm_fast.analysis import simulate
    from patchddm_fast.analysis.planner import region_channels

    channels = region_channels(args.method, args.target) if getattr(args, "target", "binary") != "binary" else None
    return simulate(args.method, args.mode, size=args.size, recipe=recipe or args.recipe, precision=args.precision,
                    checkpoint=args.checkpoint, offload=args.offload, batch=args.batch, ops=args.ops,
                    tiled=args.tiled, model_kwargs=channels)


def run(args: argparse.Namespace) -> int:
    report = simulate_from_args(args)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    return 0
