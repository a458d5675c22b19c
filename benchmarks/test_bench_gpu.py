"""(c) On a GPU only: time, torch.cuda.max_memory_allocated/reserved and the process's NVML
memory of the paper recipe against the engine, beside the simulator's prediction.

Skipped (with the reason) where no CUDA device or NVML is present.
Run: ``pytest benchmarks/test_bench_gpu.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

from patchddm_fast.analysis.memory_report import GB

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: this machine has none (the CPU benchmarks and the simulator run without one)",
                allow_module_level=True)
try:
    import pynvml  # noqa: F401
except ImportError:
    pytest.skip("needs NVML bindings (pip install nvidia-ml-py)", allow_module_level=True)

from patchddm_fast.analysis import simulate  # noqa: E402
from patchddm_fast.analysis.profiling import measure  # noqa: E402

# (method, mode, size): the paper's PatchDDM training patch and its whole-volume inference.
CASES = [("patchddm", "train", 128), ("patchddm", "sample", 256), ("halfres", "train", 128)]
RECIPES = [("paper", {}), ("engine", {})]


@pytest.mark.parametrize("recipe,over", RECIPES, ids=[r for r, _ in RECIPES])
@pytest.mark.parametrize("method,mode,size", CASES, ids=[f"{p}-{m}-{s}" for p, m, s in CASES])
def test_gpu_memory_and_time(benchmark, bench_results, method, mode, size, recipe, over):
    torch.cuda.empty_cache()
    result = benchmark.pedantic(lambda: measure(method, mode, size=size, recipe=recipe, steps=3, sampling_steps=3, **over),
                                rounds=1, iterations=1)
    s = result["settings"]
    predicted = simulate(method, mode, size=size, recipe=recipe, precision=s["precision"], checkpoint=s["checkpoint"],
                         offload=s["offload"], ops=s["ops"], tiled=s["tiled"])
    row = dict(workload=f"{method} {mode} {size}^3", recipe=recipe, seconds=result["seconds_per_iteration"],
               max_allocated_gb=result["max_memory_allocated"] / GB, max_reserved_gb=result["max_memory_reserved"] / GB,
               nvml_gb=result["nvml_peak_bytes"] / GB, predicted_allocated_gb=predicted.peak_allocated_rounded_bytes / GB,
               predicted_reserved_gb=predicted.peak_reserved_bytes / GB, device=result["device"], settings=s)
    benchmark.extra_info.update(row)
    bench_results["gpu"].append(row)
