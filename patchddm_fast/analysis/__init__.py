"""Analysis (layer 5): simulate, plan and measure the GPU memory of PatchDDM training and sampling.

Owns the memory tracker, the caching-allocator model, the simulator, the planner, the
profiler, the scaling model and the memory report:

* :func:`simulate` -- run the real train step (:mod:`patchddm_fast.diffusion.steps`) or
  the real sampler (:func:`patchddm_fast.sampling.segment.sample_batches`) on fake tensors
  and report live-tensor, allocator-level and process-level peaks with a breakdown (:class:`MemoryReport`);
  :mod:`.tracker` and :mod:`.allocator` are its two halves.
* :func:`plan` -- the fastest settings that fit a GPU (:class:`Plan`);
  :func:`~.planner.required_process_bytes` -- the smallest budget a simulated run fits;
  :func:`~.planner.plan_training` / :func:`~.planner.plan_sampling` turn a budget into the
  :class:`~patchddm_fast.model.execution.policy.ExecutionPlan` the trainer and the sampler
  receive; :func:`oom_advice` turns an out-of-memory error into the plan's suggestion.

May import every layer below (core, kernels, data, model, diffusion, eval, training,
sampling, config); only the CLI and the package's face import it.
"""
from patchddm_fast.analysis.allocator import CUDA_CONTEXT_BYTES, CachingAllocatorModel, replay
from patchddm_fast.analysis.memory_report import MemoryReport
from patchddm_fast.analysis.planner import Plan, fits_budget, oom_advice, plan
from patchddm_fast.analysis.simulate import Settings, recipe_settings, simulate

__all__ = [
    "CUDA_CONTEXT_BYTES", "CachingAllocatorModel", "MemoryReport", "Plan", "Settings", "fits_budget", "oom_advice",
    "plan", "recipe_settings", "replay", "simulate",
]
