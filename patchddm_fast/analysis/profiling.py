"""Measure real GPU memory of the simulator's workloads: NVML timeline + allocator peaks.

Used by ``patchddm profile`` and the GPU benchmark.  :func:`measure` runs N training steps
or one DDIM pass of the exact workload :mod:`patchddm_fast.diffusion.steps` defines, on random data, while
:class:`NvmlSampler` samples the process's device memory in a thread.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from patchddm_fast.analysis.simulate import PAPER_SIZES, recipe_settings
from patchddm_fast.diffusion import steps as workload
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.execution.policy import ExecutionPolicy
from patchddm_fast.model.execution.precision import resolve_precision
from patchddm_fast.model.unet import UNet3D


class NvmlSampler(threading.Thread):
    """Samples this process's device memory (NVML) until stopped; falls back to device-wide use
    when NVML cannot see the process (e.g. inside a PID namespace) -- ``source`` says which."""

    def __init__(self, device_index: int, interval_s: float = 0.005):
        super().__init__(daemon=True)
        import pynvml  # nvidia-ml-py

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.interval_s = interval_s
        self.samples: List[Tuple[float, int]] = []
        self.source = "process"
        self._stop_event = threading.Event()

    def read(self) -> int:
        if self.source == "process":
            try:
                for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                        return int(proc.usedGpuMemory)
            except self.nvml.NVMLError:
                pass
            self.source = "device"
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def run(self) -> None:
        start = time.perf_counter()
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter() - start, self.read()))
            time.sleep(self.interval_s)

    def stop(self) -> int:
        """Stop sampling; the peak of the timeline."""
        self._stop_event.set()
        self.join()
        self.samples.append((float("nan"), self.read()))
        return max(b for _, b in self.samples)


def measure(method: str, mode: str, size: Optional[int] = None, recipe: str = "engine", batch: int = 1,
            steps: int = 3, sampling_steps: int = 3, interval_s: float = 0.005, **overrides: Any) -> Dict[str, Any]:
    """Run the workload on the current CUDA device and return measured peaks and timings.

    ``overrides`` are the simulator's settings (precision, checkpoint, offload, ops, tiled);
    precision "auto"/unset resolves for this GPU (bf16 on Ampere+).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measuring GPU memory needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    asked = overrides.get("precision")
    s = recipe_settings(recipe, mode, **{k: v for k, v in overrides.items() if k != "precision"})
    precision = resolve_precision(asked or ("auto" if recipe == "engine" else s.precision), device)
    size = size or PAPER_SIZES[(method, mode)]
    torch.cuda.init()
    sampler = NvmlSampler(device.index, interval_s)
    before = sampler.read()
    policy = ExecutionPolicy(ops=s.ops, recompute=s.checkpoint, offload=s.offload, tiled=s.tiled)
    model = UNet3D.from_method(method, policy=policy).to(device)
    cin = model.config["in_channels"]
    gen = torch.Generator(device=device).manual_seed(0)
    times: List[float] = []
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    sampler.start()
    try:
        _run_workload(mode, model, precision, s, cin, size, batch, steps, sampling_steps, device, gen, times)
    finally:
        nvml_peak = sampler.stop()
    steady = times[1:] or times
    return dict(
        method=method, mode=mode, size=size, recipe=recipe, settings=dict(s.to_dict(), precision=precision.name),
        device=torch.cuda.get_device_name(device), nvml_source=sampler.source, nvml_before_bytes=before,
        nvml_peak_bytes=nvml_peak, max_memory_allocated=torch.cuda.max_memory_allocated(device),
        max_memory_reserved=torch.cuda.max_memory_reserved(device),
        context_estimate_bytes=nvml_peak - torch.cuda.max_memory_reserved(device),
        seconds_per_iteration=statistics.median(steady), iteration_seconds=times,
        timeline=[(round(t, 4), b) for t, b in sampler.samples[:: max(1, len(sampler.samples) // 200)]],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_workload(mode: str, model, precision, s, cin: int, size: int, batch: int, steps: int, sampling_steps: int,
                  device: torch.device, gen: torch.Generator, times: List[float]) -> None:
    """``steps`` training steps, or one DDIM pass of ``sampling_steps`` evaluations; appends per-iteration times."""
    diffusion = Diffusion()
    if mode == "train":
        inputs = workload.train_inputs(cin, size, batch, device=device, generator=gen)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            start = time.perf_counter()
            workload.train_step(model, diffusion, optimizer, precision, inputs)
            _sync(device)
            times.append(time.perf_counter() - start)
        return
    cond_dtype = precision.dtype if s.input_dtype == "compute" else torch.float32
    inputs = workload.eval_inputs(cin, size, batch, device=device, cond_dtype=cond_dtype, generator=gen)
    model.eval()
    cond = inputs["cond"]

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = workload.network_eval(model, dict(cond=cond, x_t=x_t, t=t), autocast=precision.autocast())
        _sync(device)
        times.append(time.perf_counter() - start)
        return out

    with torch.no_grad():
        for _ in diffusion.ddim_loop(eps, tuple(inputs["x_t"].shape), sampling_steps, device=device, generator=gen):
            pass
