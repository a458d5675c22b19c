"""Whole-volume segmentation by DDIM sampling (or another sampler of :mod:`patchddm_fast.diffusion.samplers`),
with ensembles -- one member at a time or several as one network batch -- and a progress bar.

The network sees the whole (padded) volume in one pass -- no stitching (PAPER.md).  An
ensemble draws N samples from different initial noise; their mean is the prediction
(thresholded at 0.5) and their variance the uncertainty map.  Padding to the network's
size multiple and HalfRes decimation happen here and are undone before returning, so the
result is on the grid the caller passed in.

Every network evaluation is :func:`patchddm_fast.diffusion.steps.network_eval`.  How the
network runs (ops, skip offload, tiling, precision, members per batch) comes from the
:class:`~patchddm_fast.model.execution.policy.ExecutionPlan` the caller passes; the sampler
never plans (the CLI asks the planner when ``--memory-budget`` is given).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchddm_fast.data.patches import pad_to_multiple, unpad
from patchddm_fast.data.regions import tumour_mask
from patchddm_fast.diffusion.samplers import DEFAULT_SAMPLER, check_sampler, nfe, sample_loop
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.diffusion.steps import network_eval
from patchddm_fast.model.conditioning import condition
from patchddm_fast.model.execution.policy import ExecutionPlan, ExecutionPolicy
from patchddm_fast.model.execution.precision import resolve_precision
from patchddm_fast.model.method import get_method


class NonFiniteSampleError(ValueError):
    """The network produced NaN/Inf while sampling: a damaged or diverged model, never a valid mask."""


class SamplingOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """CUDA ran out of memory sampling a network grid of edge ``size``; the CLI answers it with
    the planner's advice for that size (``patchddm_fast.analysis.planner.oom_advice``)."""

    def __init__(self, message: str, method: str, size: int):
        super().__init__(message)
        self.method, self.size = method, size


@dataclass
class SegmentationResult:
    """Ensemble statistics on the input grid: mean (prediction), var (uncertainty), mask.

    Shapes are (D, H, W) for a whole-tumour model and (3, D, H, W) for a region model
    (WT/TC/ET channels; the mask is nested, ET ⊂ TC ⊂ WT, see :mod:`patchddm_fast.data.regions`).
    """

    mean: torch.Tensor
    var: torch.Tensor
    mask: torch.Tensor
    samples: Optional[torch.Tensor] = None  # (N, D, H, W) or (N, 3, D, H, W) when keep_samples=True


def flush_denormals_on_cpu(device: torch.device) -> None:
    """Treat subnormal floats as zero on the CPU (a process-wide setting).

    Zero-initialised output convolutions make early activations and gradients subnormal,
    and x86 handles subnormals in microcode, which can slow CPU kernels badly (with the
    oneDNN convolutions of the engine the demo's step time is the same either way, as
    measured on 2026-12-01).  Results change by less than 1e-38 per value.
    """
    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)


# Members per batch without a memory plan, by device type (measured, see NOTES_samplers.md).
DEFAULT_MEMBER_BATCH = {"cpu": 1, "cuda": 1}


def member_batch_for(ensemble: int, *, eta: float = 0.0, sampler: str = DEFAULT_SAMPLER, device="cpu",
                     requested: Optional[int] = None, plan: Optional[ExecutionPlan] = None) -> int:
    """How many ensemble members to sample as one network batch.

    * ``requested`` (``--member-batch``) wins, capped at ``ensemble``;
    * stochastic DDIM (eta > 0) draws step noise between a member's network calls, so only
      one member at a time reproduces the one-at-a-time noise: 1;
    * a plan's ``member_batch`` (the planner's largest batch that fits the budget), capped at
      ``ensemble``;
    * otherwise :data:`DEFAULT_MEMBER_BATCH` for the device type.
    """
    stochastic = eta != 0 and sampler == "ddim"
    if requested is not None:
        if stochastic and requested > 1:
            raise ValueError(f"member_batch = {requested} needs eta = 0: stochastic DDIM (eta = {eta}) samples "
                             f"one member at a time so its step noise matches the sequential run")
        return max(1, min(int(requested), ensemble))
    if stochastic or ensemble == 1:
        return 1
    if plan is not None and plan.member_batch is not None:
        return max(1, min(int(plan.member_batch), ensemble))
    return max(1, min(DEFAULT_MEMBER_BATCH.get(torch.device(device).type, 1), ensemble))


def size_multiple_of(model: torch.nn.Module) -> int:
    return int(getattr(model, "size_multiple", 1))


def mask_channels_of(model: torch.nn.Module) -> int:
    """Channels of the diffused mask: the network's output channels (1, or 3 for regions)."""
    return int(getattr(model, "config", {}).get("out_channels", 1))


def network_grid(image_shape: Sequence[int], model: torch.nn.Module, method: str) -> Tuple[int, int, int]:
    """The spatial shape the network sees for an image of spatial shape ``image_shape``:
    padded to the size multiple (twice it for HalfRes), then HalfRes-decimated by 2 -- what
    :func:`segment_volume` feeds it, and what a sampling plan must be made for."""
    factor = 2 if method == "halfres" else 1
    multiple = size_multiple_of(model) * factor
    padded = [-(-int(s) // multiple) * multiple for s in tuple(image_shape)[-3:]]
    return tuple(-(-s // factor) for s in padded)  # type: ignore[return-value]


@contextlib.contextmanager
def executing(model: torch.nn.Module, policy: ExecutionPolicy) -> Iterator[None]:
    """Run ``model`` with ``policy``'s ops, skip offload and tiling inside the block, restoring
    its own policy afterwards (activation recompute is irrelevant without gradients).  A model
    already running with them is left as it is (and keeps its offload store: the memory
    simulator's, which counts host copies)."""
    old_policy = model.policy
    wanted = dataclasses.replace(old_policy, ops=policy.ops, offload=policy.offload, tiled=policy.tiled)
    if wanted == old_policy:
        yield
        return
    model.apply_policy(wanted)
    try:
        yield
    finally:
        model.apply_policy(old_policy)


# One batch of finished ensemble members, as the device side yields it: the member indices,
# a 0-dim bool device tensor (all their values finite) and the samples (B, C, *input grid).
SampleBatch = Tuple[List[int], torch.Tensor, torch.Tensor]


def sample_batches(
    model: torch.nn.Module,
    diffusion: Diffusion,
    image: torch.Tensor,
    *,
    method: str,
    ensemble: int = 5,
    steps: int = 20,
    seed: int = 0,
    eta: float = 0.0,
    autocast: Optional[contextlib.AbstractContextManager] = None,
    plan: Optional[ExecutionPlan] = None,
    members: Optional[Sequence[int]] = None,
    sampler: str = DEFAULT_SAMPLER,
    member_batch: Optional[int] = None,
    bar: Optional[tqdm] = None,
) -> Iterator[SampleBatch]:
    """The device side of :func:`segment_volume` (same arguments): pad and condition the image,
    draw every member's noise from the seeded generator, run the sampler, and yield each batch
    of finished members as ``(members, finite, x)``: ``finite`` a 0-dim bool device tensor
    (every value of the batch's samples is finite), ``x`` the samples (B, C, *image grid) on
    the device, HalfRes-upsampled, padding cropped (a view).

    It reads no tensor value and copies nothing to the host, so the memory simulator runs
    exactly this code on fake tensors (:mod:`patchddm_fast.analysis.simulate`, mode "sample");
    :func:`segment_volume` does the host side (the finite check, the copies to the host, the
    ensemble statistics).  ``bar``: a progress bar advanced per network evaluation.
    """
    param = next(model.parameters())
    device = param.device
    factor = get_method(method).decimation  # HalfRes samples the decimated volume, then upsamples
    edge = max(network_grid(image.shape[-3:], model, method))
    ctx = autocast
    cond_dtype = torch.float32
    if autocast is None and plan is not None:
        precision = resolve_precision(plan.precision, device)
        # Hold the conditioning in the compute dtype, as the planner's simulation does: under
        # autocast the first convolution casts its input to that dtype anyway (bit-identical).
        ctx, cond_dtype = precision.autocast(), precision.dtype
    channels = mask_channels_of(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    chosen = set(range(ensemble)) if members is None else {int(m) for m in members}
    try:
        # On the device from here on only what the steps need: the conditioning in the dtype the
        # network reads it in, and the current x; the padded image, the fp32 conditioning, the
        # queued initial noise and the previous step's x0 and output are dropped as soon as
        # they are used (the memory simulator counts exactly this).
        padded, pad_spec = pad_to_multiple(image.to(device), get_method(method).size_multiple(size_multiple_of(model)))
        del image  # the caller's; on the device only its copy, which padding consumed
        cond = condition(padded, method)[None]
        del padded
        cond = cond.to(cond_dtype)
        grid = (1, channels, *cond.shape[-3:])
        model.eval()
        running = executing(model, plan.policy) if plan is not None else contextlib.nullcontext()
        with running:
            def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return network_eval(model, dict(cond=cond, x_t=x_t, t=t), autocast=ctx)

            batch = member_batch_for(len(chosen), eta=eta, sampler=sampler, device=device, requested=member_batch,
                                     plan=plan)
            # Stochastic DDIM draws step noise between a member's network calls: such members run
            # one at a time, right after their initial noise, as the sequential sampler draws them.
            stochastic = eta != 0 and sampler == "ddim"
            queue: List[Tuple[int, torch.Tensor]] = []

            def run_queue() -> SampleBatch:
                done = [m for m, _ in queue]
                loop = sample_loop(diffusion, sampler, eps_model, torch.cat([n for _, n in queue]), steps, eta=eta,
                                   generator=generator)
                queue.clear()  # the loop holds its copy of the noise until the first step replaces it
                x = None
                for i, x in enumerate(loop):
                    if bar is not None:
                        bar.update(len(done) * (2 if sampler == "heun" and i + 1 < steps else 1))
                finite = torch.isfinite(x).all()
                if factor > 1:
                    x = F.interpolate(x, scale_factor=factor, mode="nearest")
                return done, finite, unpad(x, pad_spec)

            for member in range(ensemble):
                # Member by member from the one generator: the draws one-at-a-time sampling makes.
                noise = torch.randn(grid, generator=generator, device=device, dtype=torch.float32)
                if member not in chosen:
                    if stochastic:  # same draws, no network: keeps later members' noise
                        for _ in sample_loop(diffusion, sampler, lambda x_t, t: torch.zeros_like(x_t), noise, steps,
                                             eta=eta, generator=generator):
                            pass
                    del noise
                    continue
                if bar is not None:
                    bar.set_postfix(sample=f"{member + 1}/{ensemble}")
                queue.append((member, noise))
                del noise  # the queue holds it until its batch starts
                if stochastic or len(queue) == batch:
                    yield run_queue()
            if queue:
                yield run_queue()
    except torch.cuda.OutOfMemoryError as exc:
        if isinstance(exc, SamplingOutOfMemoryError):
            raise
        raise SamplingOutOfMemoryError(str(exc), method, edge) from exc
    finally:
        model.train(was_training)


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
    plan: Optional[ExecutionPlan] = None,
    members: Optional[Sequence[int]] = None,
    sampler: str = DEFAULT_SAMPLER,
    member_batch: Optional[int] = None,
    fill_holes: bool = True,
) -> SegmentationResult:
    """Segment one volume ``image`` (4, D, H, W) with intensities in [0, 1].

    Args:
        method: a method name (:data:`~patchddm_fast.model.method.METHODS`) -- must match how the
            model was trained.
        ensemble: number of samples N (each from its own initial noise).
        steps: DDIM steps per sample (PAPER.md: about 20 match 1000).
        seed: the ensemble is a deterministic function of this seed.
        progress: show a tqdm bar over ensemble x steps with an ETA.
        autocast: optional context manager (e.g. from :mod:`patchddm_fast.model.execution.precision`)
            wrapped around every network evaluation; fp32 when omitted (as the paper).
        plan: how to run the network (e.g. the planner's answer to a memory budget,
            :func:`patchddm_fast.analysis.planner.plan_sampling`): its policy's ops, skip
            offload and tiling for the duration of the call, its precision unless
            ``autocast`` is given (the conditioning is then held in the compute dtype, as the
            planner's simulation does), and its ``member_batch`` (:func:`member_batch_for`).
            None: the model as it is, fp32 unless ``autocast``.  A CUDA out-of-memory error
            is raised as :class:`SamplingOutOfMemoryError` (method and grid edge attached).
        members: compute only these ensemble members (0-based, of ``ensemble``); the
            others' random draws are made and discarded without the network, so member k
            is bit-identical to member k of the full ensemble.  mean/var/mask then describe
            only these members (the distributed predictor reduces them over ranks).
        sampler: "ddim" (the paper), "dpmpp2m" or "heun" (:mod:`patchddm_fast.diffusion.samplers`);
            ``steps`` are its solver steps (Heun evaluates the network 2 * steps - 1 times).
        member_batch: ensemble members per network batch; None lets :func:`member_batch_for`
            choose.  Each member's initial noise is drawn from the seeded generator in member
            order exactly as one-at-a-time sampling draws it, so batching changes no noise.
        fill_holes: fill the gaps the predicted whole tumour (and tumour core) encloses
            (:func:`patchddm_fast.data.regions.tumour_mask`, which makes every mask).

    The device work is :func:`sample_batches` (what the memory simulator runs); this function
    checks each batch for non-finite values, copies the samples to the host and reduces them.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    if members is not None and any(not 0 <= int(m) < ensemble for m in members):
        raise ValueError(f"members must lie in [0, {ensemble}), got {list(members)}")
    check_sampler(sampler)
    if member_batch is not None and member_batch < 1:
        raise ValueError(f"member_batch must be >= 1, got {member_batch}")
    flush_denormals_on_cpu(next(model.parameters()).device)
    shape = tuple(image.shape[-3:])
    channels = mask_channels_of(model)
    chosen = ensemble if members is None else len({int(m) for m in members})
    samples = []
    bar = tqdm(total=chosen * nfe(sampler, steps), desc=desc or "sampling", unit="eval", disable=not progress,
               leave=False)
    batches = sample_batches(model, diffusion, image, method=method, ensemble=ensemble, steps=steps, seed=seed, eta=eta,
                             autocast=autocast, plan=plan, members=members, sampler=sampler,
                             member_batch=member_batch, bar=bar)
    try:
        with contextlib.closing(batches):  # closed at once on an error: the model's mode is restored
            for done, finite, x in batches:
                if not bool(finite):
                    raise NonFiniteSampleError(
                        f"{desc or 'sampling'}: the network produced non-finite values (NaN/Inf) in ensemble "
                        f"member(s) {[m + 1 for m in done]}; the model's weights are damaged or its training diverged")
                samples.extend((x[k] if channels > 1 else x[k, 0]).cpu() for k in range(len(done)))
                del x, finite
    finally:
        bar.close()
    if not samples:  # a rank with no members of this ensemble
        empty = torch.zeros((0, *((channels,) if channels > 1 else ()), *shape))
        return SegmentationResult(mean=empty.sum(0), var=empty.sum(0),
                                  mask=tumour_mask(empty.sum(0), threshold, fill_holes),
                                  samples=empty if keep_samples else None)
    stack = torch.stack(samples)
    assert tuple(stack.shape[-3:]) == shape, (stack.shape, shape)
    mean = stack.mean(0)
    var = stack.var(0, unbiased=False)
    mask = tumour_mask(mean, threshold, fill_holes)
    return SegmentationResult(mean=mean, var=var, mask=mask, samples=stack if keep_samples else None)
