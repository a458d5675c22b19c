"""``patchddm sample``: ensemble-sample held-out phantom (or dataset) cases from a checkpoint."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator

import torch

from patchddm_fast.core.validation import float_in, int_at_least


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", type=int_at_least(1), default=5,
                   help="samples per case; mean = prediction, variance = uncertainty")
    p.add_argument("--sampling-steps", type=int_at_least(1), default=20, help="DDIM steps per sample (about 20 match 1000)")
    p.add_argument("--sampling-seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--eta", type=float_in(0.0, 1.0), default=0.0, help="DDIM eta: 0 is deterministic DDIM (the paper), 1 DDPM-like")
    p.add_argument("--threshold", type=float, default=0.5, help="mask = ensemble mean > threshold")
    add_fill_holes_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampler_flags(p)
    add_memory_budget_flag(p)


def add_fill_holes_flag(p: argparse.ArgumentParser) -> None:
    """--no-fill-holes (shared by demo, sample and predict; see data.regions.tumour_mask)."""
    p.add_argument("--no-fill-holes", dest="fill_holes", action="store_false",
                   help="keep the gaps the predicted whole tumour / tumour core enclose (filled by default: they "
                        "are missed necrotic core, which both regions contain)")


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """--sampler and --member-batch (shared by demo, sample and predict)."""
    from patchddm_fast.diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS

    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                   help="ddim: the paper's; dpmpp2m: DPM-Solver++(2M); heun: deterministic Heun (EDM), which "
                        "evaluates the network 2 x steps - 1 times")
    p.add_argument("--member-batch", type=int, default=None, metavar="N",
                   help="ensemble members sampled as one network batch (default: 1 on CPU and without "
                        "--memory-budget; with a budget the planner picks the largest batch that fits)")


def add_memory_budget_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="GPU memory to stay within, e.g. 8GB: the planner picks precision, skip offload and tiling")


@contextlib.contextmanager
def planner_advice_on_oom(method: str, mode: str) -> Iterator[None]:
    """Raise a CUDA out-of-memory error inside the block as a RuntimeError holding the memory
    planner's advice (train, sample, predict, demo): for the grid the sampler ran out on
    (:class:`SamplingOutOfMemoryError` names it), else for ``mode``.  The trainer and the
    sampler never call the planner; the commands do."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        from patchddm_fast.analysis.planner import oom_advice  # the simulator loads only when advice is needed
        from patchddm_fast.sampling.segment import SamplingOutOfMemoryError

        if isinstance(exc, SamplingOutOfMemoryError):
            raise RuntimeError(oom_advice(exc, method=exc.method, mode="sample", size=exc.size)) from exc
        raise RuntimeError(oom_advice(exc, method=method, mode=mode)) from exc


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample", help="sample whole held-out volumes from a checkpoint and score them",
        description="Load a checkpoint, segment the held-out cases of its data source (phantoms by default) "
        "with a DDIM ensemble, and write NIfTI files, PNG montages and metrics.json into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint written by `patchddm train`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--cases", type=int_at_least(1), default=None,
                   help="number of held-out phantom cases (default: the run's phantom_val)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_sampling_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.cli.showcase import evaluate_cases, format_table
    from patchddm_fast.training.config import TrainConfig
    from patchddm_fast.core.devices import resolve_device
    from patchddm_fast.training.checkpoint import data_multiple, load_for_inference
    from patchddm_fast.training.sources import load_cases

    model, diffusion, cfg_dict = load_for_inference(args.model, device=resolve_device(args.device))
    config = TrainConfig.from_dict(cfg_dict, source=f"checkpoint {args.model}")
    if args.cases is not None:
        config.phantom_val = args.cases
    _, val_cases = load_cases(config, data_multiple(config.to_dict()))
    with planner_advice_on_oom(config.method, "sample"):
        metrics = evaluate_cases(model, diffusion, config.method, val_cases, Path(args.out), ensemble=args.ensemble,
                                 steps=args.sampling_steps, seed=args.sampling_seed, progress=not args.quiet,
                                 memory_budget=args.memory_budget, eta=args.eta, threshold=args.threshold,
                                 overwrite=args.overwrite, sampler=args.sampler, member_batch=args.member_batch,
                                 convention=config.label_convention, fill_holes=args.fill_holes)
    print(format_table(metrics))
    return 0
