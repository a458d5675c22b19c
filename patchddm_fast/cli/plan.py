"""``patchddm plan``: the fastest engine settings that fit a GPU memory budget."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    from patchddm_fast.analysis.simulate import MODES
    from patchddm_fast.cli.memory import simulated_methods
    from patchddm_fast.model.execution.precision import PRECISIONS

    p = sub.add_parser(
        "plan", help="pick checkpointing/offload/precision/patch size that fit a GPU",
        description="Simulate candidate settings from the fastest to the most memory-frugal and print the "
        "first that fits the budget (allocator model with the budget as capacity, CUDA context included), "
        "its predicted peak and its recompute cost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="GPU memory, e.g. 8GB (10^9 bytes) or 8GiB")
    p.add_argument("--method", default="patchddm", choices=simulated_methods(), help="method")
    p.add_argument("--mode", default="train", choices=MODES, help="training or sampling")
    p.add_argument("--size", type=int, default=None,
                   help="pin the patch/volume edge (default: PatchDDM tries patches 128 then 64; sampling uses the whole volume)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="pin the precision (auto: bf16 on Ampere+, fp16 before)")
    p.add_argument("--headroom", type=float, default=0.05,
                   help="fraction of the budget kept free for cuDNN/cuBLAS workspaces")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.analysis import plan

    p = plan(args.gpu_memory, method=args.method, mode=args.mode, size=args.size, precision=args.precision,
             headroom=args.headroom)
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.format_text())
    return 0 if p.fits else 1
