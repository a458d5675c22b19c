"""A model of data-parallel scaling: bytes all-reduced, overlap with backward, step time.

Method (stated so the numbers can be checked by hand):

* **Bytes.**  DDP all-reduces one fp32 gradient per parameter each step: ``4 * P`` bytes
  (P = 24,260,299 for the paper's PatchDDM network: 97.04 MB).  A ring all-reduce sends
  and receives ``2 (N-1)/N`` times that per GPU.
* **Time of one all-reduce** of S bytes on N GPUs: ``2 (N-1)/N * S / busbw + 2 (N-1) * alpha``
  -- nccl-tests' definition of bus bandwidth ``busbw`` plus a per-ring-step latency alpha.
* **Compute.**  The paper's measured 0.340 s per training iteration (A100, 128^3 patches,
  batch 1) is the single-GPU step.  Backward costs twice the forward's convolution FLOPs,
  so it is the last 2/3 of the step (the AdamW step is included in the 0.340 s and ignored).
* **When gradients are ready.**  The network is traced once on the meta device at the
  patch size; every module's share of the backward time is its share of the convolution
  (and linear) FLOPs, and backward visits modules in reverse forward order.  A parameter's
  gradient is ready when its module's backward is done.
* **Buckets.**  Parameters are packed into DDP's buckets in reverse registration order
  (first bucket 1 MiB, then 25 MiB, :func:`~.simulate.ddp_bucket_sizes`); a bucket is
  all-reduced once all its gradients are ready, buckets one after another on one stream.
* **Exposed communication** = end of the last all-reduce - end of backward (never < 0);
  step time = compute + exposed.  Overlap = 1 - exposed / total communication time.

Not modelled: NCCL kernels slowing the overlapping convolutions (a few %), stragglers,
data loading, and hierarchical (intra-node NVLink + inter-node network) all-reduce.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from patchddm_fast.analysis.simulate import DDP_BUCKET_CAP_BYTES, DDP_FIRST_BUCKET_BYTES
from patchddm_fast.model.unet import UNet3D

PAPER_STEP_SECONDS = 0.340  # PAPER.md resource table: PatchDDM training, A100 80 GB, 128^3, batch 1
BACKWARD_FRACTION = 2.0 / 3.0  # backward = 2x the forward's FLOPs (input and weight gradients)
GPU_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Link:
    """An interconnect as NCCL sees it: bus bandwidth (bytes/s) and latency per ring step (s)."""

    name: str
    bus_bandwidth: float
    alpha: float
    note: str


LINKS: Dict[str, Link] = {
    "nvlink": Link("NCCL over NVLink (A100 SXM, NVSwitch)", 230e9, 5e-6,
                   "busbw 230 GB/s: nccl-tests all_reduce on 8x A100 SXM for large messages "
                   "(NVLink3 line rate 300 GB/s per direction)"),
    "ethernet": Link("NCCL over 100 Gb/s Ethernet (one GPU per machine)", 10e9, 30e-6,
                     "busbw 10 GB/s: 80% of the 12.5 GB/s line rate (RoCE/sockets); 30 us per ring step"),
}


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each GPU sends (and receives) in a ring all-reduce of ``nbytes`` over ``n`` GPUs."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 2.0 * (n - 1) / n * nbytes


def allreduce_seconds(nbytes: float, n: int, link: Link) -> float:
    """Time of one ring all-reduce (0 on one GPU)."""
    if n == 1:
        return 0.0
    return ring_allreduce_bytes(nbytes, n) / link.bus_bandwidth + 2 * (n - 1) * link.alpha


def backward_profile(method: str = "patchddm", size: int = 128,
                     model_kwargs: Optional[Dict[str, Any]] = None) -> List[Tuple[int, float]]:
    """(parameter bytes, share of backward time) per parameterised module, in backward order.

    Traced on the meta device (no memory, no data); a module's share is its FLOPs
    (2 x MACs of its convolution / linear layer) over the network's."""
    with torch.device("meta"):
        model = UNet3D.from_method(method, **(model_kwargs or {}))  # reference ops: the default policy
    order: List[Tuple[torch.nn.Module, float]] = []

    def hook(module, inputs, output):
        w = getattr(module, "weight", None)
        flops = 0.0
        if isinstance(module, (torch.nn.Conv3d, torch.nn.Linear)) and w is not None:
            per_output = w.numel() / w.shape[0]
            flops = 2.0 * per_output * output.numel()
        order.append((module, flops))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if any(True for _ in m.parameters(recurse=False))]
    cin = model.config["in_channels"]
    x = torch.zeros((1, cin, size, size, size), device="meta")
    t = torch.zeros((1,), dtype=torch.long, device="meta")
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    total = sum(f for _, f in order) or 1.0
    seen = set()
    profile = []
    for module, flops in reversed(order):
        if id(module) in seen:  # a module called twice counts its time at each call, its bytes once
            profile.append((0, flops / total))
            continue
        seen.add(id(module))
        nbytes = sum(p.numel() * 4 for p in module.parameters(recurse=False))
        profile.append((nbytes, flops / total))
    return profile


def bucket_ready_times(profile: Sequence[Tuple[int, float]], backward_s: float,
                       first_cap: int = DDP_FIRST_BUCKET_BYTES, cap: int = DDP_BUCKET_CAP_BYTES
                       ) -> List[Tuple[int, float]]:
    """(bucket bytes, time its last gradient is ready, from the start of backward)."""
    buckets: List[Tuple[int, float]] = []
    clock, current, limit = 0.0, 0, first_cap
    for nbytes, share in profile:
        clock += share * backward_s
        if nbytes == 0:
            continue
        current += nbytes
        if current >= limit:
            buckets.append((current, clock))
            current, limit = 0, cap
    if current:
        buckets.append((current, clock))
    return buckets


def exposed_communication(buckets: Sequence[Tuple[int, float]], backward_s: float, n: int,
                          link: Link) -> Tuple[float, float]:
    """(total all-reduce time, time the step waits for it after backward) for ready-timed buckets."""
    finish, total = 0.0, 0.0
    for nbytes, ready in buckets:
        duration = allreduce_seconds(nbytes, n, link)
        total += duration
        finish = max(finish, ready) + duration
    return total, max(0.0, finish - backward_s)


def step_estimate(n: int, link: Link, profile: Sequence[Tuple[int, float]], compute_s: float = PAPER_STEP_SECONDS
                  ) -> Dict[str, Any]:
    """The model's numbers for ``n`` GPUs on ``link`` (see the module docstring)."""
    backward = BACKWARD_FRACTION * compute_s
    grad_bytes = sum(b for b, _ in profile)
    buckets = bucket_ready_times(profile, backward)
    comm, exposed = exposed_communication(buckets, backward, n, link)
    step = compute_s + exposed
    return dict(gpus=n, link=link.name, gradient_bytes=grad_bytes,
                bytes_per_gpu_on_wire=ring_allreduce_bytes(grad_bytes, n), buckets=len(buckets),
                allreduce_s=comm, exposed_s=exposed, overlap=1.0 - exposed / comm if comm > 0 else 1.0,
                step_s=step, samples_per_s=n / step, speedup=n * compute_s / step, efficiency=compute_s / step)


def scaling_table(method: str = "patchddm", size: int = 128, gpus: Sequence[int] = GPU_COUNTS,
                  links: Sequence[str] = ("nvlink", "ethernet"), compute_s: float = PAPER_STEP_SECONDS
                  ) -> Dict[str, Any]:
    """Rows for every GPU count and link, plus the assumptions they rest on."""
    profile = backward_profile(method, size)
    rows = [step_estimate(n, LINKS[name], profile, compute_s) for name in links for n in gpus]
    return dict(method=method, size=size, compute_s=compute_s, backward_fraction=BACKWARD_FRACTION,
                parameters=sum(b for b, _ in profile) // 4, links={k: asdict(LINKS[k]) for k in links}, rows=rows)


def format_table(table: Dict[str, Any]) -> str:
    lines = ["| GPUs | interconnect | all-reduced per step | sent per GPU | all-reduce time | hidden in backward "
             "| exposed | step time | speed-up | efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['gpus']} | {r['link']} | {r['gradient_bytes'] / 1e6:.2f} MB | "
                     f"{r['bytes_per_gpu_on_wire'] / 1e6:.2f} MB | {r['allreduce_s'] * 1e3:.1f} ms | "
                     f"{r['overlap'] * 100:.0f}% | {r['exposed_s'] * 1e3:.1f} ms | {r['step_s']:.3f} s | "
                     f"{r['speedup']:.2f}x | {r['efficiency'] * 100:.0f}% |")
    return "\n".join(lines)
