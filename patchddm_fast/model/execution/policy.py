"""How the network runs, as one value: the execution policy and the plan a run receives.

The model is told *how* to run (ops backend, activation recompute, offload, tiling) by an
:class:`ExecutionPolicy`; it never decides this itself and never imports the analysis
layer that can choose one.  The trainer and the sampler receive an :class:`ExecutionPlan`
(the policy plus precision and the run-level sizes); they never call the planner.  The
planner (``patchddm_fast.analysis.planner``) produces plans; the CLI and the package's
face hand them down.

This module only names the choices; each choice's validation lives next to the code that
implements it (``backend.OPS_BACKENDS``, ``unet.RECOMPUTE_MODES``, ``offload.OFFLOAD_MODES``);
:meth:`patchddm_fast.model.unet.UNet3D.apply_policy` checks and installs a policy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

# Saved activations smaller than this stay on the device under offload "all".
DEFAULT_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class ExecutionPolicy:
    """What the network executes with.

    ops: "reference" (plain PyTorch, the paper's code) or "fused" (the custom kernels).
    recompute: activation recompute ("activation checkpointing"): "none", "selective",
        "block" or "level" -- see :mod:`patchddm_fast.model.execution.recompute`.
    offload: "none", "skips" or "all" -- tensors waiting in pinned host memory.
    tiled: slab-wise low-memory inference (no-grad forward only).
    offload_min_bytes: the smallest saved activation worth offloading (offload "all").
    slab_rows: depth rows per slab of the tiled executor (None: 1/32 of the input depth).
    """

    ops: str = "reference"
    recompute: str = "none"
    offload: str = "none"
    tiled: bool = False
    offload_min_bytes: int = DEFAULT_MIN_BYTES
    slab_rows: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExecutionPlan:
    """What a training run or a sampler executes with: the model's policy, the precision,
    and the sizes the plan chose (patch size for training, ensemble members per batch for
    sampling; None = the caller's own).  ``predicted_process_bytes`` records what the
    simulator predicted for it (None when the plan was not simulated)."""

    policy: ExecutionPolicy = ExecutionPolicy()
    precision: str = "auto"
    patch_size: Optional[int] = None
    member_batch: Optional[int] = None
    predicted_process_bytes: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
