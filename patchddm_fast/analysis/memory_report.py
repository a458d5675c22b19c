"""The memory simulator's result: one dataclass, JSON-ready, with a readable text form."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from patchddm_fast.core.units import fmt_bytes

GB = 1e9  # reports use decimal gigabytes (1 GB = 10^9 bytes), the stricter reading of "8GB"


@dataclass
class MemoryReport:
    """Simulated device memory of one training step or of the sampler (``segment_volume``).

    Byte fields:
        peak_allocated_bytes: the exact peak of live tensor bytes (what a tensor-level count
            gives; ``torch.cuda.max_memory_allocated`` minus the allocator's rounding).
        peak_allocated_rounded_bytes: the same after the caching allocator's 512-byte
            rounding and unsplit blocks (= ``torch.cuda.max_memory_allocated``).
        peak_reserved_bytes: segments the caching allocator model holds at its peak
            (= ``torch.cuda.max_memory_reserved``).
        cuda_context_bytes: the stated CUDA-context constant (see ``allocator.CUDA_CONTEXT_BYTES``).
        peak_process_bytes: reserved + context: the estimate of what nvidia-smi / NVML shows
            (``process_peak_bytes`` in the JSON form too, the name the targets use).
        peak_host_bytes: peak of pinned host memory holding offloaded tensors.
        breakdown: bytes alive at the device peak per category (weights, gradients,
            optimizer_state, inputs, sampler_state [what the sampler allocates outside the
            network: conditioning, x, noise, the network input], weight_copies [autocast casts
            of weights], activations).
        top_allocations: the largest groups of activations alive at the peak, by the module
            (or backward node) that allocated them.
    """

    method: str
    mode: str
    size: int
    batch: int
    recipe: str
    settings: Dict[str, Any]
    peak_allocated_bytes: int
    peak_allocated_rounded_bytes: int
    peak_reserved_bytes: int
    cuda_context_bytes: int
    peak_process_bytes: int
    peak_host_bytes: int
    peak_where: str
    breakdown: Dict[str, int]
    top_allocations: List[Tuple[str, int]]
    totals: Dict[str, int]
    conv_flops: Dict[str, int]
    recompute_fraction: float
    steps: int
    simulated_seconds: float
    notes: List[str] = field(default_factory=list)
    # The device allocation sequence (("alloc"|"free", id, bytes), ...): replayed by the
    # planner through the allocator model with a capacity.  Not serialised.
    events: List[Tuple[str, int, int]] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "events"}
        d = json.loads(json.dumps(d))
        d["top_allocations"] = [{"where": w, "bytes": b} for w, b in self.top_allocations]
        d["peak_allocated_gb"] = round(self.peak_allocated_bytes / GB, 3)
        d["peak_reserved_gb"] = round(self.peak_reserved_bytes / GB, 3)
        d["peak_process_gb"] = round(self.peak_process_bytes / GB, 3)
        # The name the project's targets use (issue 9): the same number as peak_process_bytes.
        d["process_peak_bytes"] = self.peak_process_bytes
        return d

    def format_text(self) -> str:
        s = self.settings
        lines = [
            f"{self.method} {self.mode} at {self.size}^3 (batch {self.batch}), recipe {self.recipe}: "
            + ", ".join(f"{k}={v}" for k, v in s.items()),
            f"  peak live tensors     {fmt_bytes(self.peak_allocated_bytes):>10}   (at {self.peak_where})",
            f"  allocator: allocated  {fmt_bytes(self.peak_allocated_rounded_bytes):>10}   reserved {fmt_bytes(self.peak_reserved_bytes)}",
            f"  + CUDA context        {fmt_bytes(self.cuda_context_bytes):>10}   = process {fmt_bytes(self.peak_process_bytes)}",
        ]
        if self.peak_host_bytes:
            lines.append(f"  host (offloaded)      {fmt_bytes(self.peak_host_bytes):>10}")
        lines.append("  at the peak: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.breakdown.items() if v))
        if self.top_allocations:
            lines.append("  largest activations alive at the peak, by where they were allocated:")
            for where, nbytes in self.top_allocations:
                lines.append(f"    {fmt_bytes(nbytes):>10}  {where}")
        if self.mode == "train":
            lines.append(f"  recompute: {100 * self.recompute_fraction:.1f}% extra convolution FLOPs")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
