"""``patchddm profile``: measure a GPU's real memory timeline beside the simulator's prediction.

Runs N training steps (or one DDIM sampling pass of K network evaluations) of the same
workload the simulator models (:mod:`patchddm_fast.diffusion.steps`) on random data, while
NVML samples the process's device memory (:mod:`patchddm_fast.analysis.profiling`).  Prints
the timeline peak, the caching allocator's own peaks and the prediction for the same
settings -- the calibration of the simulator (and of its CUDA-context constant) a user with
a GPU runs in one command.  Without a GPU it says so and exits with status 3.
"""
from __future__ import annotations

import argparse
import json
import sys

from patchddm_fast.cli.memory import add_memory_flags

NO_GPU_EXIT = 3


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "profile", help="measure GPU memory (NVML timeline) next to the simulator's prediction (needs a GPU)",
        description="Run training steps or a sampling pass on random data on the GPU while NVML samples the "
        "process's memory; print the measured peaks beside `patchddm memory`'s prediction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_memory_flags(p)
    p.add_argument("--steps", type=int, default=3, help="training steps to run (train mode)")
    p.add_argument("--sampling-steps", type=int, default=3, help="DDIM network evaluations (sample mode)")
    p.add_argument("--interval-ms", type=float, default=5.0, help="NVML sampling interval")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("patchddm profile: no CUDA GPU is available, so there is nothing to measure. "
              "`patchddm memory` gives the simulated prediction without a GPU.", file=sys.stderr)
        return NO_GPU_EXIT
    try:
        import pynvml  # noqa: F401  (nvidia-ml-py)
    except ImportError:
        print("patchddm profile: NVML bindings are missing; `pip install nvidia-ml-py`.", file=sys.stderr)
        return NO_GPU_EXIT
    from patchddm_fast.analysis import simulate
    from patchddm_fast.analysis.profiling import measure
    from patchddm_fast.core.units import fmt_bytes

    m = measure(args.method, args.mode, size=args.size, recipe=args.recipe, batch=args.batch, steps=args.steps,
                sampling_steps=args.sampling_steps, interval_s=args.interval_ms / 1000.0, precision=args.precision,
                checkpoint=args.checkpoint, offload=args.offload, ops=args.ops, tiled=args.tiled)
    s = m["settings"]
    p = simulate(args.method, args.mode, size=m["size"], recipe=args.recipe, precision=s["precision"],
                 checkpoint=s["checkpoint"], offload=s["offload"], batch=args.batch, ops=s["ops"], tiled=s["tiled"])
    if args.json:
        print(json.dumps(dict(measured=m, predicted=p.to_dict()), indent=2))
        return 0
    print(f"{args.method} {args.mode} at {m['size']}^3 on {m['device']}: {s}")
    print(f"  {'':30}{'measured':>12}{'predicted':>12}")
    print(f"  {'max_memory_allocated':30}{fmt_bytes(m['max_memory_allocated']):>12}{fmt_bytes(p.peak_allocated_rounded_bytes):>12}")
    print(f"  {'max_memory_reserved':30}{fmt_bytes(m['max_memory_reserved']):>12}{fmt_bytes(p.peak_reserved_bytes):>12}")
    print(f"  {'NVML ' + m['nvml_source'] + ' timeline peak':30}{fmt_bytes(m['nvml_peak_bytes']):>12}{fmt_bytes(p.peak_process_bytes):>12}")
    print(f"  context + workspaces measured {fmt_bytes(m['context_estimate_bytes'])} "
          f"(simulator's constant {fmt_bytes(p.cuda_context_bytes)}); {m['seconds_per_iteration']:.3f} s per iteration")
    return 0
