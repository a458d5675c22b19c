"""Data parallelism under torchrun: who am I, which device, and the few collectives we need.

One module owns everything distributed so that the trainer and ``patchddm predict`` stay
single-process code with a handful of calls into it:

* :func:`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
  picks the device (``cuda:LOCAL_RANK`` or the CPU) and starts the process group -- NCCL
  on GPUs, gloo on the CPU -- with a finite timeout (``PATCHDDM_DIST_TIMEOUT`` seconds,
  default 600), so a rank whose peer was killed or hangs stops with an error instead of
  waiting forever.  Outside torchrun (or at world size 1) nothing is initialised and every
  helper here is a no-op: single-process runs are bit-identical to the code before DDP.
* :func:`wrap_ddp` wraps the network in ``DistributedDataParallel``.  Gradients are
  all-reduced in the parameters' dtype, fp32 (autocast computes in bf16/fp16 but the
  parameters and their gradients stay fp32): the exact average, and GradScaler's overflow
  check sees identical gradients on every rank.  A bf16 compression hook would halve the
  bytes on the wire (see NOTES/BENCHMARKS) at the cost of that exactness; we do not use it.
* :func:`shard` / :func:`gather_in_order` split a list over ranks and put the per-item
  results back in the original order (sharded validation and prediction).
* :func:`reduce_ensemble` combines ensemble members computed on different ranks into the
  mean and (population) variance: one all-reduce of the float64 sum, then one of the
  float64 sum of squared deviations from that mean (the two-pass algorithm, distributed),
  so no rank ever gathers another rank's sample volumes.
"""
from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import torch

from patchddm_fast.core.devices import resolve_device
from patchddm_fast.data.regions import tumour_mask
from patchddm_fast.sampling.segment import SegmentationResult, segment_volume

T = TypeVar("T")

TIMEOUT_ENV = "PATCHDDM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# Test hook: "RANK:STEP[:kill|stop]" makes that rank SIGKILL (or SIGSTOP) itself just before
# training step STEP (0-based), so tests can kill a rank at a known point of a real run.
FAULT_ENV = "PATCHDDM_DIST_FAULT"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run; ``world_size == 1`` means not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False  # this init() started the process group (and shutdown() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {value}")
    return value


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def local_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device ``name`` ("auto", "cpu", "cuda", "cuda:N") means for this rank.

    Under DDP each rank takes ``cuda:LOCAL_RANK``; an explicit index is refused there because
    every rank would pile onto the same GPU."""
    device = resolve_device(name)  # a clear sentence when the device does not exist here
    if distributed and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device {name!r}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda or auto")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def env_world_size() -> int:
    """The number of ranks torchrun launched (1 outside torchrun), before any process group exists."""
    return _env_int("WORLD_SIZE", 1) if launched_by_torchrun() else 1


def init(device_name: str = "auto") -> Tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; returns (context, device)."""
    world = env_world_size()
    if world <= 1:
        return DistContext(), local_device(device_name)
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = local_device(device_name, local_rank, distributed=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_seconds()
    owner = not dist.is_initialized()
    if owner:
        kwargs = dict(device_id=device) if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    else:
        backend = dist.get_backend()
    return DistContext(rank, world, local_rank, backend, timeout, owner), device


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if ``ctx``'s init() started it (after a clean run; a failed one just exits)."""
    if ctx.enabled and ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` on a distributed run, the model itself otherwise.

    Every parameter receives a gradient each step, so ``find_unused_parameters`` stays off
    (it would cost a graph traversal per step).  Checkpointing uses ``use_reentrant=False``,
    which DDP's autograd hooks handle without ``static_graph``."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # The network has no buffers, so DDP's per-forward buffer broadcast has nothing to do.
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def global_indices(ctx: DistContext, batch_size: int) -> range:
    """This rank's sample indices of the step's global batch (size world_size x batch_size)."""
    return range(ctx.rank * batch_size, (ctx.rank + 1) * batch_size)


def shard(items: Sequence[T], ctx: DistContext) -> List[T]:
    """Items rank, rank + N, rank + 2N, ... (round robin, so ranks get near-equal shares)."""
    return list(items[ctx.rank::ctx.world_size])


def gather_in_order(local: List[Any], n_items: int, ctx: DistContext) -> List[Any]:
    """Inverse of :func:`shard`: every rank's per-item results, in the original item order."""
    if not ctx.enabled:
        return list(local)
    import torch.distributed as dist

    parts: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, local)
    out: List[Any] = [None] * n_items
    for r, part in enumerate(parts):
        out[r::ctx.world_size] = part
    return out


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The average of a tensor over ranks (returned unchanged when not distributed)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out / ctx.world_size


def agree(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on all (so none waits for the rest).

    Used for checks (output folder, resume compatibility) whose failure on one rank would
    otherwise leave the others blocked in the next collective until the timeout."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        result, error = None, exc
    if not ctx.enabled:
        if error is not None:
            raise error
        return result  # type: ignore[return-value]
    import torch.distributed as dist

    errors: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for r, msg in enumerate(errors):
        if msg is not None:
            raise RuntimeError(f"rank {r} failed: {msg}")
    return result  # type: ignore[return-value]


def same_on_all_ranks(value: Any, what: str, ctx: DistContext) -> None:
    """Refuse to continue when ranks disagree about ``value`` (e.g. the resumed step)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    values: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"ranks disagree about {what}: {values}; on several machines the run folder must be on a "
                           f"file system every rank sees")


def check_resume_world(path: Any, ckpt_world: int, ckpt_batch: int, world: int, batch: int) -> None:
    """Resuming is exact when the global batch (world size x batch) is the checkpoint's.

    The samples of a step are keyed by their global index, so 2 ranks x batch 1 and 1 rank x
    batch 2 draw the same samples (their gradients agree to float rounding); a different
    global batch would silently change the run, so it is refused."""
    if ckpt_world * ckpt_batch != world * batch:
        raise ValueError(
            f"checkpoint {path} was trained with world size {ckpt_world} x batch {ckpt_batch} (global batch "
            f"{ckpt_world * ckpt_batch}); this run has world size {world} x batch {batch} (global batch "
            f"{world * batch}). Resume with --nproc {ckpt_world} (torchrun --nproc_per_node) or a batch size giving "
            f"the same global batch, or start a new --out-dir")


def collective_failure(exc: BaseException, ctx: DistContext, step: int) -> RuntimeError:
    """The one-line error a rank reports when a step fails under DDP (a peer died, hung or erred)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RuntimeError(
        f"{ctx.describe()} stopped at training step {step + 1}: {first}. When another rank is killed, crashes or "
        f"hangs, the others stop like this within the process-group timeout ({ctx.timeout_s:g}s, {TIMEOUT_ENV}); "
        f"restart the same command to resume from the last checkpoint")


def maybe_inject_fault(ctx: DistContext, step: int) -> None:
    """Test hook (``PATCHDDM_DIST_FAULT=RANK:STEP[:kill|stop]``): this rank kills or stops itself."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or not ctx.enabled:
        return
    parts = spec.split(":")
    if int(parts[0]) == ctx.rank and int(parts[1]) == step:
        os.kill(os.getpid(), signal.SIGSTOP if parts[2:] == ["stop"] else signal.SIGKILL)


def reduce_ensemble(local: torch.Tensor, ensemble: int, ctx: DistContext) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, population variance) as float32 of all ranks' members; ``local`` is (k, ...) this rank's.

    Two-pass in float64: all-reduce sum(x) -> mean; all-reduce sum((x - mean)^2) -> variance.
    Each rank sends two volumes, never its samples; the result is on every rank."""
    import torch.distributed as dist

    if local.shape[0] > 0:
        total = local.double().sum(0)
    else:
        total = torch.zeros(local.shape[1:], dtype=torch.float64, device=local.device)
    if ctx.enabled:
        dist.all_reduce(total)
    mean = total / ensemble
    if local.shape[0] > 0:
        m2 = (local.double() - mean).square().sum(0)
    else:
        m2 = torch.zeros_like(mean)
    if ctx.enabled:
        dist.all_reduce(m2)
    return mean.float(), (m2 / ensemble).float()


def sharded_ensemble_segmenter(ctx: DistContext) -> Callable[..., Any]:
    """A drop-in for :func:`patchddm_fast.sampling.segment.segment_volume` that spreads one case's
    ensemble over the ranks: rank r computes members r, r + N, ... (each exactly the member
    a single process would compute) and :func:`reduce_ensemble` combines them.  Every rank
    returns the same result; only the caller's rank 0 should write it."""

    def segment(model: torch.nn.Module, diffusion: Any, image: torch.Tensor, *, ensemble: int = 5,
                threshold: float = 0.5, fill_holes: bool = True, **kwargs: Any):
        mine = list(range(ctx.rank, ensemble, ctx.world_size))
        res = segment_volume(model, diffusion, image, ensemble=ensemble, threshold=threshold, members=mine,
                             keep_samples=True, **kwargs)
        device = next(model.parameters()).device if ctx.backend == "nccl" else torch.device("cpu")
        mean, var = reduce_ensemble(res.samples.to(device), ensemble, ctx)
        mean, var = mean.cpu(), var.cpu()
        return SegmentationResult(mean=mean, var=var, mask=tumour_mask(mean, threshold, fill_holes))

    return segment
