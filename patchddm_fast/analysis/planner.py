"""Pick the fastest settings that fit a GPU: checkpointing, offload, precision, patch size.

``plan("8GB", method="patchddm", mode="train")`` walks candidate settings from the
cheapest to the most memory-frugal, simulates each (:func:`.simulate.simulate`: the
steady-state training step, or the whole sampler for ``mode="sample"``) and returns the
first whose allocator-level footprint fits: the recorded allocation sequence is replayed
through the caching-allocator model with the budget minus the CUDA context as its capacity
(so fragmentation and cached segments count, and cached segments are released under
pressure as the real allocator does), keeping ``headroom`` of the budget free for what no
tensor count sees (cuDNN/cuBLAS workspaces).

Ordering (an a-priori cost model; each plan reports the simulated recompute cost):
training: no checkpointing < selective (recomputes GroupNorm-SiLU only) < block (+~14%
convolution FLOPs) < level (+~28%) < level with offload of saved activations (transfer-
bound), each first at the largest patch (PatchDDM: 128, then 64); sampling: plain < skips
offloaded (prefetch hides the transfers) < tiled < tiled with skips offloaded.  Precision:
"auto" (simulated as bf16, which costs the same bytes as fp16) unless pinned.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from patchddm_fast.analysis import allocator
from patchddm_fast.analysis.memory_report import MemoryReport
from patchddm_fast.analysis.simulate import PAPER_SIZES, simulate
from patchddm_fast.training.config import TrainConfig
from patchddm_fast.core.units import fmt_bytes, parse_bytes
from patchddm_fast.model.execution.policy import ExecutionPlan, ExecutionPolicy
from patchddm_fast.model.method import get_method
from patchddm_fast.sampling.segment import network_grid
from patchddm_fast.training.checkpoint import build_model

DEFAULT_HEADROOM = 0.05

# (checkpoint, offload, a-priori relative cost) for training; (offload, tiled, cost) for sampling.
TRAIN_CANDIDATES: Tuple[Tuple[str, str, float], ...] = (
    ("none", "none", 1.00), ("selective", "none", 1.03), ("block", "none", 1.16), ("level", "none", 1.30),
    ("level", "all", 1.60))
SAMPLE_CANDIDATES: Tuple[Tuple[str, bool, float], ...] = (
    ("none", False, 1.00), ("skips", False, 1.10), ("none", True, 1.30), ("skips", True, 1.40))
PATCH_SIZES = (128, 64)


@dataclass
class Candidate:
    settings: Dict[str, Any]
    size: int
    peak_allocated_bytes: int
    peak_process_bytes: int
    fits: bool
    recompute_fraction: float


@dataclass
class Plan:
    """The planner's answer.  ``settings`` is what Trainer/sampler consume:
    ``{"checkpoint", "offload", "precision", "patch_size", "ops", "tiled"}``."""

    method: str
    mode: str
    gpu_memory_bytes: int
    headroom: float
    fits: bool
    settings: Dict[str, Any]
    size: int
    predicted_peak_bytes: int          # live tensors
    predicted_process_bytes: int       # allocator reserve (at this capacity) + CUDA context
    recompute_fraction: float
    report: Optional[MemoryReport] = field(default=None, repr=False)
    candidates: List[Candidate] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("report",)}
        d["report"] = self.report.to_dict() if self.report else None
        return d

    def cli_flags(self) -> str:
        s = self.settings
        flags = [f"--precision {s['precision']}", f"--checkpoint {s['checkpoint']}", f"--ops {s['ops']}"]
        if self.mode == "train" and s.get("patch_size") is not None:
            flags.append(f"--patch-size {s['patch_size']}")
        if s.get("offload", "none") != "none":
            flags.append(f"--offload {s['offload']}")
        if s.get("tiled"):
            flags.append("--tiled")
        return " ".join(flags)

    def format_text(self) -> str:
        head = (f"{self.method} {self.mode} on {fmt_bytes(self.gpu_memory_bytes)} "
                f"(keeping {self.headroom:.0%} free for workspaces):")
        if not self.fits:
            best = min(self.candidates, key=lambda c: c.peak_process_bytes) if self.candidates else None
            tail = (f" the most frugal setting tried needs {fmt_bytes(best.peak_process_bytes)} ({best.settings})"
                    if best else "")
            return head + " nothing fits." + tail
        s = self.settings
        lines = [head,
                 "  settings: " + ", ".join(f"{k}={v}" for k, v in s.items()),
                 f"  flags:    {self.cli_flags()}",
                 f"  predicted peak: {fmt_bytes(self.predicted_peak_bytes)} live tensors, "
                 f"{fmt_bytes(self.predicted_process_bytes)} with allocator cache and CUDA context",
                 f"  expected recompute cost: {100 * self.recompute_fraction:.1f}% extra convolution FLOPs"
                 + (" (plus host transfers)" if s.get("offload", "none") != "none" else "")]
        for c in self.candidates:
            mark = "fits" if c.fits else "too big"
            lines.append(f"    tried {c.settings}: {fmt_bytes(c.peak_process_bytes)} ({mark})")
        return "\n".join(lines)


def fits_budget(report: MemoryReport, gpu_memory: int, headroom: float = DEFAULT_HEADROOM) -> Tuple[bool, int]:
    """Replay ``report``'s allocations with the budget as capacity: (fits, reserved peak + context)."""
    capacity = int(gpu_memory * (1.0 - headroom)) - report.cuda_context_bytes
    if capacity <= 0:
        return False, report.peak_reserved_bytes + report.cuda_context_bytes
    stats = allocator.replay(report.events, capacity=capacity)
    if stats.oom:  # report what it would need, not where the replay stopped
        return False, report.peak_reserved_bytes + report.cuda_context_bytes
    return True, stats.peak_reserved + report.cuda_context_bytes


def required_process_bytes(report: MemoryReport, resolution: int = allocator.MiB) -> int:
    """The smallest process budget (allocator capacity + CUDA context, no headroom) whose replay
    of ``report``'s allocations does not run out, to ``resolution``: what a card must have.

    Below ``report.peak_process_bytes`` when the unbounded replay keeps cached segments that
    the allocator would release under pressure (e.g. the sampler's conditioning temporaries);
    never below the rounded live-tensor peak."""
    lo, hi = report.peak_allocated_rounded_bytes - 1, report.peak_reserved_bytes  # lo fails, hi fits
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        if allocator.replay(report.events, capacity=mid).oom:
            lo = mid
        else:
            hi = mid
    return hi + report.cuda_context_bytes


def _candidates(method: str, mode: str, size: Optional[int], patch_sizes: Sequence[int]):
    if mode == "train":
        sizes = [size] if size else ([p for p in patch_sizes] if get_method(method).patches
                                     else [PAPER_SIZES[(method, "train")]])
        for s in sizes:
            for ckpt, off, cost in TRAIN_CANDIDATES:
                yield s, dict(checkpoint=ckpt, offload=off, tiled=False), cost
    else:
        s = size or PAPER_SIZES[(method, "sample")]
        for off, tiled, cost in SAMPLE_CANDIDATES:
            yield s, dict(checkpoint="none", offload=off, tiled=tiled), cost


def plan(gpu_memory: Union[str, int, float], method: str = "patchddm", mode: str = "train",
         size: Optional[int] = None, precision: str = "auto", headroom: float = DEFAULT_HEADROOM,
         patch_sizes: Sequence[int] = PATCH_SIZES, model_kwargs: Optional[Dict[str, Any]] = None,
         ddp: bool = False) -> Plan:
    """The fastest engine settings for ``method``/``mode`` that fit ``gpu_memory`` (e.g. "8GB").

    ``size`` pins the training patch / input edge (default: PatchDDM tries 128 then 64;
    FullRes 256, HalfRes 128; sampling uses the whole volume, 256 or 128).  Returns a
    :class:`Plan` with ``fits=False`` (and every candidate tried) when nothing fits.
    ``ddp``: training under DistributedDataParallel; the plan is per rank (its local GPU)
    and counts DDP's gradient buckets.
    """
    budget = parse_bytes(gpu_memory)
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if mode not in ("train", "sample"):
        raise ValueError(f"mode must be 'train' or 'sample', got {mode!r}")
    tried: List[Candidate] = []
    for s, knobs, _cost in _candidates(method, mode, size, patch_sizes):
        report = simulate(method, mode, size=s, recipe="engine", precision=precision, steps=1, warm_start=True,
                          model_kwargs=model_kwargs, **({"ddp": True} if ddp and mode == "train" else {}), **knobs)
        ok, process = fits_budget(report, budget, headroom)
        settings = _settings(report, precision, mode, method)
        tried.append(Candidate(settings, s, report.peak_allocated_bytes, process, ok, report.recompute_fraction))
        if ok:
            return Plan(method, mode, budget, headroom, True, settings, s, report.peak_allocated_bytes, process,
                        report.recompute_fraction, report, tried)
    best = min(tried, key=lambda c: c.peak_process_bytes)
    return Plan(method, mode, budget, headroom, False, best.settings, best.size, best.peak_allocated_bytes,
                best.peak_process_bytes, best.recompute_fraction, None, tried)


def _settings(report: MemoryReport, precision: str, mode: str, method: str) -> Dict[str, Any]:
    r = report.settings
    out: Dict[str, Any] = dict(checkpoint=r["checkpoint"], offload=r["offload"],
                               precision=precision if precision != "auto" else "auto", ops=r["ops"],
                               tiled=bool(r["tiled"]))
    out["patch_size"] = report.size if (mode == "train" and get_method(method).patches) else None
    return out


def oom_advice(exc: BaseException, method: str, mode: str, gpu_memory: Union[str, int, float, None] = None,
               size: Optional[int] = None) -> str:
    """Turn an out-of-memory error into the planner's suggestion (a message to show the user).

    ``gpu_memory`` defaults to the current CUDA device's total memory.
    """
    if gpu_memory is None:
        if not torch.cuda.is_available():
            return f"{exc}\nOut of memory; run `patchddm plan --gpu-memory <size> --method {method} --mode {mode}`."
        gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    p = plan(gpu_memory, method=method, mode=mode, size=size)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if p.fits:
        return (f"Out of memory ({first}).\nThe memory planner suggests for {method} {mode} on "
                f"{fmt_bytes(p.gpu_memory_bytes)}: {p.cli_flags()} (settings {p.settings}); predicted peak "
                f"{fmt_bytes(p.predicted_process_bytes)} including allocator cache and CUDA context.")
    return (f"Out of memory ({first}).\nNo engine setting fits {method} {mode} into {fmt_bytes(p.gpu_memory_bytes)}; "
            f"the most frugal ({p.settings}) needs about {fmt_bytes(p.predicted_process_bytes)}.")


def planner_arch(arch: Dict[str, Any], method: Optional[str] = None, target: str = "binary") -> Dict[str, Any]:
    """A network's architecture (UNet3D arguments, e.g. ``model.config``) as the planner's
    ``model_kwargs``: hashable, so simulations of the same network are cached once.  With a
    ``method``, the input/output channels of ``target`` are added (regions: 3 mask channels,
    which change only the first and last convolutions)."""
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    if method is not None and target != "binary":
        out.update(region_channels(method, target))
    return out


def region_channels(method: str, target: str) -> Dict[str, int]:
    """UNet3D in/out channels of a ``target`` ("binary" or "regions") for ``method``."""
    return get_method(method).network_channels(target)


def max_sample_batch(p: Plan, model: Any, method: str, size: int, limit: int) -> int:
    """The largest number of ensemble members (at most ``limit``) whose batched sampling (the
    real sampler with that member batch), simulated with ``p``'s settings for ``model``'s
    architecture, still fits ``p``'s budget; 1 when even two do not (the plan itself was made
    for one member).

    Peak memory grows with the batch, so a binary search over [1, limit] finds it with
    about log2(limit) simulations (each cached).
    """
    def fits(batch: int) -> bool:
        s = p.settings
        report = simulate(p.method, "sample", size=size, recipe="engine", precision=s["precision"],
                          checkpoint="none", offload=s["offload"], tiled=s["tiled"], batch=batch, steps=1,
                          warm_start=True, model_kwargs=planner_arch(model.config))
        return fits_budget(report, p.gpu_memory_bytes, p.headroom)[0]

    lo, hi = 1, max(1, int(limit))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def execution_plan(p: Plan, member_batch: Optional[int] = None) -> ExecutionPlan:
    """What the trainer or the sampler receives for a plan that fits."""
    s = p.settings
    policy = ExecutionPolicy(ops=s["ops"], recompute=s["checkpoint"], offload=s["offload"], tiled=bool(s["tiled"]))
    return ExecutionPlan(policy=policy, precision=s["precision"], patch_size=s.get("patch_size"),
                         member_batch=member_batch, predicted_process_bytes=p.predicted_process_bytes)


def plan_training(config: TrainConfig, ddp: bool = False) -> ExecutionPlan:
    """The plan for ``config.memory_budget``: recompute, offload, precision and patch size
    (the configured patch, then half of it, among sizes the network accepts).  ``ddp``:
    per rank under DistributedDataParallel.  Raises ``RuntimeError`` with the planner's
    explanation when nothing fits."""
    arch = planner_arch(config.model, config.method, config.target)
    with torch.device("meta"):  # the network's size multiple, without weights
        multiple = build_model(config.to_dict()).size_multiple
    patch_sizes = tuple(s for s in (config.patch_size, config.patch_size // 2) if s >= multiple and s % multiple == 0)
    p = plan(config.memory_budget, method=config.method, mode="train", precision=config.precision,
             patch_sizes=patch_sizes, model_kwargs=arch, ddp=ddp)
    if not p.fits:
        raise RuntimeError(p.format_text())
    return execution_plan(p)


def plan_sampling(model: Any, gpu_memory: Union[str, int, float], method: str, image_shape: Sequence[int],
                  ensemble: int = 1) -> ExecutionPlan:
    """The plan for sampling an image of spatial shape ``image_shape`` with ``model`` (its own
    architecture) within ``gpu_memory``: ops, skip offload, tiling and precision for the whole
    sampler (:func:`~patchddm_fast.sampling.segment.segment_volume`'s device side simulated: its
    conditioning, noise, x and the network evaluations on the grid it feeds the network), and
    the largest number of ensemble members (at most ``ensemble``) that fit as one batch.
    Raises ``RuntimeError`` with the planner's explanation when nothing fits."""
    size = max(network_grid(image_shape, model, method))
    p = plan(gpu_memory, method=method, mode="sample", size=size, model_kwargs=planner_arch(model.config))
    if not p.fits:
        raise RuntimeError(p.format_text())
    return execution_plan(p, member_batch=max_sample_batch(p, model, method, size, ensemble))
