"""The memory simulator: run the real training step / the real sampler on fake tensors.

``simulate(method, mode, size, recipe, ...)`` builds the real :class:`UNet3D` under
``FakeTensorMode`` (CPU fake tensors: shapes, dtypes and storages without data), runs the
real code -- ``Diffusion.training_loss`` under the precision policy's autocast, backward,
``AdamW.step`` (twice, so the optimizer state exists), or the device side of the real
``segment_volume`` (:func:`~patchddm_fast.sampling.segment.sample_batches`: padding,
conditioning, initial noise and :data:`SAMPLE_STEPS` DDIM steps of one ensemble member, or
``batch`` members as one network batch, with everything the sampler keeps on the device) --
inside a :class:`~.tracker.MemoryTracker`, and replays the recorded allocations through the
caching-allocator model.

Why fake CPU tensors: fake CUDA tensors do not survive autograd on CPU-only builds, and
meta tensors do not see autocast.  CPU autocast treats every op of this network exactly
like CUDA autocast (convolutions and linear layers in the low precision, GroupNorm and the
loss computed in fp32 explicitly, everything else in its input dtype), so the simulated
step casts what a GPU step casts.  Differences from a real CUDA step, all small: GradScaler
is modelled as the scaled loss (its other buffers are a few scalars), and kernels' private
workspaces (cuDNN, cuBLAS) are outside PyTorch's accounting (see :mod:`.allocator`).

The two recipes:

* ``paper``: reference ops, fp16 autocast for training with GroupNorm in the reference
  code's order (``GroupNorm32``: x.float() -> GN -> back to fp16, then ``nn.SiLU`` in fp16),
  fp32 for inference, no checkpointing, conditioning held in fp32;
* ``engine``: fused ops, bf16 (as on an Ampere+ GPU), block checkpointing for training,
  in-place skip averages, skips freed as soon as consumed, no-grad inference with the
  network input in the compute dtype, optional offload and tiled inference.

``ddp=True`` adds DistributedDataParallel's gradient buckets to a training step: flat
buffers holding a second copy of every gradient (``gradient_as_bucket_view=False``, DDP's
default, which the trainer uses), allocated when DDP wraps the model and alive for the
whole run (:func:`ddp_bucket_sizes`).  NCCL's own communication buffers are outside
PyTorch's allocator and are not counted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from patchddm_fast.analysis import allocator
from patchddm_fast.analysis.memory_report import MemoryReport
from patchddm_fast.analysis.tracker import (ACTIVATIONS, GRADIENTS, INPUTS, OPTIMIZER, SAMPLER_STATE, WEIGHT_COPIES,
                                            WEIGHTS, MemoryTracker)
from patchddm_fast.diffusion import steps as workload
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.backend import check_backend
from patchddm_fast.model.execution.offload import OFFLOAD_MODES, SimulatedHostStore
from patchddm_fast.model.execution.precision import NoScaler, Precision
from patchddm_fast.model.execution.policy import ExecutionPlan, ExecutionPolicy
from patchddm_fast.model.method import COORDINATE_CHANNELS, METHODS, get_method
from patchddm_fast.model.unet import RECOMPUTE_MODES, UNet3D
from patchddm_fast.sampling.segment import sample_batches

MODES = ("train", "sample")
RECIPES = ("engine", "paper")
# The paper's input edges per (method, mode) (PAPER.md): the default of every simulation.
PAPER_SIZES = {("patchddm", "train"): 128, ("patchddm", "sample"): 256, ("fullres", "train"): 256,
                 ("fullres", "sample"): 256, ("halfres", "train"): 128, ("halfres", "sample"): 128}
ENGINE_TRAIN_CHECKPOINT = "block"
# DDIM steps the sample mode runs: the second network evaluation is the steady state (the
# previous step's x, x0 and network output exist), every later one repeats it.
SAMPLE_STEPS = 2


@dataclass(frozen=True)
class Settings:
    """How the network runs.  ``input_dtype``: "fp32" or "compute" (the precision's dtype)."""

    ops: str = "fused"
    precision: str = "bf16"
    checkpoint: str = "none"
    offload: str = "none"
    tiled: bool = False
    input_dtype: str = "fp32"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def fused_ops_available() -> bool:
    try:
        import patchddm_fast.kernels  # noqa: F401
    except Exception:  # the ops package is optional until its extension builds
        return False
    return True


def recipe_settings(recipe: str, mode: str, **overrides: Any) -> Settings:
    """The recipe's defaults for ``mode`` with non-None ``overrides`` applied."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if recipe == "paper":
        base = Settings(ops="reference", precision="fp16" if mode == "train" else "fp32", checkpoint="none")
    elif mode == "train":
        base = Settings(ops="fused", precision="bf16", checkpoint=ENGINE_TRAIN_CHECKPOINT)
    else:
        base = Settings(ops="fused", precision="bf16", input_dtype="compute")
    over = {k: v for k, v in overrides.items() if v is not None}
    if over.get("precision") == "auto":
        over["precision"] = "bf16"  # simulated as for a CUDA device with bf16
    return dataclasses.replace(base, **over)


@contextlib.contextmanager
def mkldnn_disabled():
    """oneDNN off (``torch.backends.mkldnn.enabled``), restored afterwards; no TF32 warning."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


class _SimScaler:
    """GradScaler as far as device memory goes: fp16 scales the loss (a scalar); the rest is in place."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.on_step: Any = lambda: None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * 65536.0 if self.enabled else loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.on_step()  # the simulator notes which storages are gradients before the step
        optimizer.step()

    def update(self) -> None:
        return None


def _check(method: str, mode: str, size: int, settings: Settings, batch: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method (method) must be one of {METHODS}, got {method!r}")
    if settings.precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16, bf16 or auto, got {settings.precision!r}")
    if settings.checkpoint not in RECOMPUTE_MODES:
        raise ValueError(f"checkpoint must be one of {RECOMPUTE_MODES}, got {settings.checkpoint!r}")
    if settings.offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {settings.offload!r}")
    if settings.input_dtype not in ("fp32", "compute"):
        raise ValueError(f"input_dtype must be 'fp32' or 'compute', got {settings.input_dtype!r}")
    check_backend(settings.ops)
    if size < 1 or batch < 1:
        raise ValueError(f"size and batch must be positive, got size={size}, batch={batch}")


def _where_group(where: str) -> str:
    """Group allocation sites at residual-block granularity: 'encoder.0.blocks.1'."""
    where = where.split(" [", 1)[0]
    for prefix in ("recompute of ", "backward of "):
        if where.startswith(prefix):
            head, _, rest = where[len(prefix):].partition(" ")
            return prefix + ".".join(head.split(".")[:4]) + (" " + rest if rest else "")
    return ".".join(where.split(".")[:4])


# DistributedDataParallel's bucketing (torch/nn/parallel/distributed.py): the first bucket is
# capped at 1 MiB so communication starts early in backward, the others at bucket_cap_mb = 25.
DDP_FIRST_BUCKET_BYTES = 1024 * 1024
DDP_BUCKET_CAP_BYTES = 25 * 1024 * 1024


def ddp_bucket_sizes(param_bytes: List[int], first_cap: int = DDP_FIRST_BUCKET_BYTES,
                     cap: int = DDP_BUCKET_CAP_BYTES) -> List[int]:
    """Bytes of each DDP gradient bucket for parameters of ``param_bytes`` (in model order).

    DDP fills buckets in reverse parameter order (the order gradients become ready in
    backward), closing a bucket once it reaches its cap (the first 1 MiB, then 25 MiB);
    buckets together hold exactly one copy of every gradient."""
    sizes: List[int] = []
    current, limit = 0, first_cap
    for nbytes in reversed(param_bytes):
        current += nbytes
        if current >= limit:
            sizes.append(current)
            current, limit = 0, cap
    if current:
        sizes.append(current)
    return sizes


@functools.lru_cache(maxsize=256)
def _simulate_cached(method: str, mode: str, size: int, batch: int, recipe: str, settings: Settings,
                     steps: int, warm_start: bool, model_items: Tuple[Tuple[str, Any], ...],
                     ddp: bool = False) -> MemoryReport:
    return _run(method, mode, size, batch, recipe, settings, steps, warm_start, dict(model_items), ddp)


def simulate(method: str = "patchddm", mode: str = "train", size: Optional[int] = None, recipe: str = "engine",
             precision: Optional[str] = None, checkpoint: Optional[str] = None, offload: Optional[str] = None,
             batch: int = 1, ops: Optional[str] = None, tiled: Optional[bool] = None,
             input_dtype: Optional[str] = None, steps: int = 2, warm_start: bool = False,
             model_kwargs: Optional[Dict[str, Any]] = None, ddp: bool = False) -> MemoryReport:
    """Simulated device memory of one training step (``mode="train"``) or of the sampler (``"sample"``).

    Args:
        method: a method name (:data:`patchddm_fast.model.method.METHODS`): the paper's network with
            that method's input channels.
        mode: "train" (forward, backward, AdamW step; ``steps`` times) or "sample" (the real
            sampler, ``segment_volume``'s device side, for ``batch`` ensemble members as one
            network batch: :data:`SAMPLE_STEPS` DDIM steps with the sampler's own tensors).
        size: edge of the cubic network input (default: the paper's, e.g. 128 for PatchDDM
            training, 256 for its inference); sampling feeds the sampler an image of this edge
            (twice it for HalfRes, which decimates).
        recipe: "engine" or "paper" (see module docstring); the remaining arguments override
            the recipe's settings.
        steps: training steps to run; the second is the steady state (optimizer state exists).
        warm_start: materialise the steady state (previous step's gradients, AdamW state)
            untracked first, so ``steps=1`` measures the steady-state step at half the cost
            (the planner uses this; a test checks it gives the two-step peak).
        model_kwargs: UNet3D overrides (e.g. a tiny network for tests).
        ddp: count DistributedDataParallel's gradient buckets (training; per rank).

    Results are cached per argument set (simulations are deterministic).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    settings = recipe_settings(recipe, mode, precision=precision, checkpoint=checkpoint, offload=offload,
                               ops=ops, tiled=tiled, input_dtype=input_dtype)
    if settings.ops == "fused" and not fused_ops_available():
        settings = dataclasses.replace(settings, ops="reference")
        warnings.warn("patchddm_fast.kernels is not importable: simulating the engine with reference ops")
    if size is None:
        size = PAPER_SIZES.get((method, mode), 0)
    _check(method, mode, size, settings, batch)
    if mode == "train" and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (model_kwargs or {}).items()))
    if ddp and mode != "train":
        raise ValueError("ddp=True describes a training step; sampling has no gradient buckets")
    if ddp:
        return _simulate_cached(method, mode, int(size), int(batch), recipe, settings, int(steps), bool(warm_start),
                                items, True)
    return _simulate_cached(method, mode, int(size), int(batch), recipe, settings, int(steps), bool(warm_start), items)


def _run(method: str, mode: str, size: int, batch: int, recipe: str, settings: Settings, steps: int,
         warm_start: bool, model_kwargs: Dict[str, Any], ddp: bool = False) -> MemoryReport:
    started = time.perf_counter()
    precision = Precision(settings.precision, torch.device("cpu"), NoScaler())
    diffusion = Diffusion()
    notes: List[str] = []
    tracker = MemoryTracker()
    # mkldnn off: the CPU-only oneDNN convolution path of the ops backend has no fake kernel,
    # and a GPU runs F.conv3d (cuDNN) anyway.
    if settings.ops == "reference":  # the backend's reference op is the reference code's order
        notes.append("GroupNorm-SiLU in the reference code's order (GroupNorm32 then nn.SiLU in the activation dtype)")
    if settings.input_dtype == "compute" and settings.precision != "fp32":
        notes.append("the sampler holds the conditioning in the compute dtype (bit-identical under autocast)")
    if mode == "sample":
        notes.append(f"the real sampler (segment_volume's device side): {batch} ensemble member(s) as one network "
                     f"batch, {SAMPLE_STEPS} DDIM steps, the sampler's own tensors in sampler_state")
    if settings.precision == "fp16" and mode == "train":
        notes.append("GradScaler modelled as the scaled loss (its other state is a few scalars)")
    with FakeTensorMode(allow_non_fake_inputs=True), mkldnn_disabled():
        model = UNet3D.from_method(method, **model_kwargs)
        if model.size_multiple and size % model.size_multiple:
            raise ValueError(f"size {size} must be a multiple of {model.size_multiple} for this network")
        cin = model.config["in_channels"]
        cmask = model.config["out_channels"]  # diffused mask channels: 1, or 3 for WT/TC/ET regions
        policy = ExecutionPolicy(ops=settings.ops, recompute=settings.checkpoint, offload=settings.offload,
                                 tiled=settings.tiled)
        model.apply_policy(policy, store=SimulatedHostStore(tracker))
        tracker.register(model.parameters(), WEIGHTS)
        tracker.register(model.buffers(), WEIGHTS)
        if ddp:
            params = list(model.parameters())
            sizes = ddp_bucket_sizes([p.numel() * p.element_size() for p in params])
            buckets = [torch.empty(n, dtype=torch.uint8) for n in sizes]
            tracker.register(buckets, GRADIENTS, where="DDP gradient buckets")
            notes.append(f"DDP gradient buckets: {len(sizes)} buckets, {sum(sizes)} bytes (one gradient copy)")
        hooks = tracker.module_hooks(model)
        grad_sids, opt_sids = set(), set()
        totals = {WEIGHTS: sum(p.numel() * p.element_size() for p in model.parameters()), GRADIENTS: 0, OPTIMIZER: 0}
        try:
            if mode == "train":
                inputs = workload.train_inputs(cin, size, batch, mask_channels=cmask)
                tracker.register(inputs.values(), INPUTS)
                scaler = _SimScaler(settings.precision == "fp16")
                scaler.on_step = lambda: grad_sids.update(
                    tracker.sid_of(p.grad) for p in model.parameters() if p.grad is not None)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=True)
                model.train()
                if warm_start:
                    for p in model.parameters():
                        p.grad = torch.zeros_like(p)
                    optimizer.step()
                    tracker.register([p.grad for p in model.parameters()], GRADIENTS)
                    tracker.register([v for st in optimizer.state.values() for v in st.values()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0], OPTIMIZER)
                with tracker:
                    for _ in range(steps):
                        workload.train_step(model, diffusion, optimizer, precision, inputs, scaler=scaler,
                                   autocast_device="cpu", phase=tracker.in_phase)
                        state = [v for st in optimizer.state.values() for v in st.values()
                                 if isinstance(v, torch.Tensor) and v.dim() > 0]
                        opt_sids |= {tracker.sid_of(v) for v in state}
                totals[GRADIENTS] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                        if p.grad is not None)
                totals[OPTIMIZER] = sum(v.numel() * v.element_size() for v in state)
            else:
                _sample(model, diffusion, method, size, batch, settings, precision, tracker)
        finally:
            for h in hooks:
                h.remove()
            tracker.close()
    stats = allocator.replay(tracker.events)
    grad_sids.discard(None)
    opt_sids.discard(None)
    return _make_report(method, mode, size, batch, recipe, settings, steps, tracker, stats, grad_sids, opt_sids,
                        totals, time.perf_counter() - started, notes)


def _sample(model: UNet3D, diffusion: Diffusion, method: str, size: int, batch: int, settings: Settings,
            precision: Precision, tracker: MemoryTracker) -> None:
    """The real sampler's device side on fake tensors: ``batch`` ensemble members as one
    network batch, :data:`SAMPLE_STEPS` DDIM steps, on an image whose network grid is ``size``.

    The image is registered as an input and handed over without a reference kept here: it
    stands for the device copy the sampler makes of the caller's host image, which lives
    only as long as the sampler holds it.  The plan carries the precision (the conditioning
    then lives in the compute dtype); ``input_dtype="fp32"`` passes the autocast instead,
    which keeps the conditioning in fp32."""
    m = get_method(method)
    cmask = model.config["out_channels"]
    image_channels = model.config["in_channels"] - cmask - (COORDINATE_CHANNELS if m.coordinates else 0)
    edge = size * m.decimation
    image = torch.empty((image_channels, edge, edge, edge), dtype=torch.float32)
    tracker.register([image], INPUTS, where="image (device copy)")
    plan = ExecutionPlan(policy=model.policy, precision=settings.precision, member_batch=batch)
    autocast = precision.autocast("cpu") if settings.input_dtype == "fp32" else None
    batches = sample_batches(model, diffusion, image, method=method, ensemble=batch, steps=SAMPLE_STEPS, seed=0,
                             autocast=autocast, plan=plan, member_batch=batch)
    del image
    with tracker, tracker.in_phase(SAMPLER_STATE), contextlib.closing(batches):
        for _ in batches:
            pass


def _make_report(method, mode, size, batch, recipe, settings, steps, tracker: MemoryTracker, stats,
                 grad_sids, opt_sids, totals, elapsed, notes) -> MemoryReport:
    def category(sid: int) -> str:
        rec = tracker.records[sid]
        if rec.category in (WEIGHTS, INPUTS, WEIGHT_COPIES, GRADIENTS, OPTIMIZER):
            return rec.category
        if rec.where.startswith(SAMPLER_STATE):
            return SAMPLER_STATE
        if sid in grad_sids:
            return GRADIENTS
        if sid in opt_sids:
            return OPTIMIZER
        return ACTIVATIONS

    order = [WEIGHTS, GRADIENTS, OPTIMIZER, INPUTS, SAMPLER_STATE, WEIGHT_COPIES, ACTIVATIONS]
    breakdown = {k: 0 for k in order}
    groups: Dict[str, int] = {}
    for sid in tracker.live_at_peak():
        cat = category(sid)
        nbytes = tracker.records[sid].nbytes
        breakdown[cat] += nbytes
        if cat == ACTIVATIONS:
            key = _where_group(tracker.records[sid].where)
            groups[key] = groups.get(key, 0) + nbytes
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:8]
    flops = dict(tracker.flops)
    base = flops["forward"] + flops["backward"]
    recompute = flops["recompute"] / base if base else 0.0
    context = allocator.CUDA_CONTEXT_BYTES
    return MemoryReport(
        method=method, mode=mode, size=size, batch=batch, recipe=recipe, settings=settings.to_dict(),
        peak_allocated_bytes=tracker.peak, peak_allocated_rounded_bytes=stats.peak_allocated,
        peak_reserved_bytes=stats.peak_reserved, cuda_context_bytes=context,
        peak_process_bytes=stats.peak_reserved + context, peak_host_bytes=tracker.host_peak,
        peak_where=tracker.peak_where.split(" [", 1)[0], breakdown=breakdown, top_allocations=top, totals=totals,
        conv_flops=flops, recompute_fraction=recompute, steps=steps if mode == "train" else 0,
        simulated_seconds=round(elapsed, 3), notes=notes, events=tracker.events,
    )
