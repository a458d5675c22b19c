"""Whole-volume segmentation by DDIM sampling, with ensembles and a progress bar.

The network sees the whole (padded) volume in one pass -- no stitching (PAPER.md).  An
ensemble draws N samples from different initial noise; their mean is the prediction
(thresholded at 0.5) and their variance the uncertainty map.  Padding to the network's
size multiple and HalfRes decimation happen here and are undone before returning, so the
result is on the grid the caller passed in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchddm_fast.conditioning import condition, network_input
from patchddm_fast.data.patches import pad_to_multiple, unpad
from patchddm_fast.diffusion import Diffusion


@dataclass
class SegmentationResult:
    """Ensemble statistics on the input grid: mean (prediction), var (uncertainty), mask."""

    mean: torch.Tensor
    var: torch.Tensor
    mask: torch.Tensor
    samples: Optional[torch.Tensor] = None  # (N, D, H, W) when keep_samples=True


def flush_denormals_on_cpu(device: torch.device) -> None:
    """Treat subnormal floats as zero on the CPU (a process-wide setting).

    Zero-initialised output convolutions make early activations and gradients subnormal,
    and x86 handles subnormals in microcode, which can slow CPU kernels badly (with the
    oneDNN convolutions of the engine the demo's step time is the same either way, as
    measured on 2026-12-01).  Results change by less than 1e-38 per value.
    """
    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)


def size_multiple_of(model: torch.nn.Module) -> int:
    return int(getattr(model, "size_multiple", 1))


@torch.no_grad()
def segment_volume(
    model: torch.nn.Module,
    diffusion: Diffusion,
    image: torch.Tensor,
    *,
    method: str,
    ensemble: int = 5,
    steps: int = 20,
    seed: int = 0,
    threshold: float = 0.5,
    eta: float = 0.0,
    progress: bool = True,
    desc: str = "",
    keep_samples: bool = False,
    autocast: Optional[contextlib.AbstractContextManager] = None,
    memory_budget: Union[str, int, None] = None,
    members: Optional[Sequence[int]] = None,
) -> SegmentationResult:
    """Segment one volume ``image`` (4, D, H, W) with intensities in [0, 1].

    Args:
        method: "patchddm", "halfres" or "fullres" -- must match how the model was trained.
        ensemble: number of samples N (each from its own initial noise).
        steps: DDIM steps per sample (PAPER.md: about 20 match 1000).
        seed: the ensemble is a deterministic function of this seed.
        progress: show a tqdm bar over ensemble x steps with an ETA.
        autocast: optional context manager (e.g. from :mod:`patchddm_fast.precision`)
            wrapped around every network evaluation; fp32 when omitted (as the paper).
        memory_budget: GPU memory to stay within, e.g. "8GB": the planner
            (:func:`patchddm_fast.memory.planner.planned_inference`) picks ops, precision,
            skip offload and tiling for this volume; its precision is used unless
            ``autocast`` is given.  A CUDA out-of-memory error is answered with the
            planner's suggestion either way.
        members: compute only these ensemble members (0-based, of ``ensemble``); the
            others' random draws are made and discarded without the network, so member k
            is bit-identical to member k of the full ensemble.  mean/var/mask then describe
            only these members (the distributed predictor reduces them over ranks).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    if members is not None and any(not 0 <= int(m) < ensemble for m in members):
        raise ValueError(f"members must lie in [0, {ensemble}), got {list(members)}")
    param = next(model.parameters())
    device = param.device
    flush_denormals_on_cpu(device)
    shape = tuple(image.shape[-3:])
    factor = 2 if method == "halfres" else 1
    padded, pad_spec = pad_to_multiple(image.to(device), size_multiple_of(model) * factor)
    cond = condition(padded, method)[None]
    grid = (1, 1, *cond.shape[-3:])
    generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    planned = contextlib.nullcontext((None, None))
    if memory_budget is not None:
        from patchddm_fast.memory.planner import planned_inference

        planned = planned_inference(model, memory_budget, method, max(cond.shape[-3:]))
    samples = []
    evaluations = (ensemble if members is None else len(set(members))) * steps
    bar = tqdm(total=evaluations, desc=desc or "sampling", unit="eval", disable=not progress, leave=False)
    try:
        with planned as (_, precision):
            ctx, net_cond = autocast, cond
            if autocast is None and precision is not None:
                # Hold the conditioning in the compute dtype, as the planner's simulation does: under
                # autocast the first convolution casts its input to that dtype anyway (bit-identical).
                ctx, net_cond = precision.autocast(), cond.to(precision.dtype)
            ctx = ctx if ctx is not None else contextlib.nullcontext()

            def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                with ctx:
                    return model(network_input(net_cond, x_t.to(net_cond.dtype)), t).float()

            chosen = set(range(ensemble)) if members is None else {int(m) for m in members}
            for member in range(ensemble):
                if member not in chosen:
                    # Same shapes, same draws from the generator, no network: keeps later members' noise.
                    for _ in diffusion.ddim_loop(lambda x_t, t: torch.zeros_like(x_t), grid, steps, eta=eta,
                                                 generator=generator, device=device):
                        pass
                    continue
                bar.set_postfix(sample=f"{member + 1}/{ensemble}")
                x = None
                for _, x, _ in diffusion.ddim_loop(eps_model, grid, steps, eta=eta, generator=generator, device=device):
                    bar.update(1)
                if factor > 1:
                    x = F.interpolate(x, scale_factor=factor, mode="nearest")
                samples.append(unpad(x[0, 0], pad_spec).cpu())
    except torch.cuda.OutOfMemoryError as exc:
        from patchddm_fast.memory import oom_advice

        raise RuntimeError(oom_advice(exc, preset=method, mode="sample", size=max(cond.shape[-3:]))) from exc
    finally:
        bar.close()
        model.train(was_training)
    if not samples:  # a rank with no members of this ensemble
        empty = torch.zeros((0, *shape))
        return SegmentationResult(mean=empty.sum(0), var=empty.sum(0), mask=empty.sum(0) > threshold,
                                  samples=empty if keep_samples else None)
    stack = torch.stack(samples)
    assert tuple(stack.shape[1:]) == shape, (stack.shape, shape)
    mean = stack.mean(0)
    var = stack.var(0, unbiased=False)
    return SegmentationResult(mean=mean, var=var, mask=mean > threshold, samples=stack if keep_samples else None)
