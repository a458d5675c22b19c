"""The memory engine: simulate, plan and cut the GPU memory of PatchDDM training and sampling.

* :func:`simulate` -- run the real training step / network evaluation on fake tensors and
  report live-tensor, allocator-level and process-level peaks with a breakdown
  (:class:`MemoryReport`); :mod:`.tracker` and :mod:`.allocator` are its two halves.
* :func:`plan` -- the fastest settings that fit a GPU (:class:`Plan`); :func:`oom_advice`
  turns an out-of-memory error into the plan's suggestion.
* what the network runs with (recompute, offload, tiling) is an ``ExecutionPolicy``
  (:mod:`patchddm_fast.model.execution.policy`), installed by ``UNet3D.apply_policy``.
"""
from patchddm_fast.analysis.allocator import CUDA_CONTEXT_BYTES, CachingAllocatorModel, replay
from patchddm_fast.analysis.planner import Plan, fits_budget, oom_advice, parse_bytes, plan
from patchddm_fast.analysis.memory_report import MemoryReport
from patchddm_fast.analysis.simulate import Settings, recipe_settings, simulate

__all__ = [
    "CUDA_CONTEXT_BYTES", "CachingAllocatorModel", "MemoryReport", "Plan", "Settings",
    "fits_budget", "oom_advice", "parse_bytes", "plan", "recipe_settings", "replay", "simulate",
]
