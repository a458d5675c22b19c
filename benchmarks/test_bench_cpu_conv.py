"""CPU speed of 3D convolution: PyTorch's own path against the engine's oneDNN path.

Forward and backward (grad input + grad weight + grad bias) of one 3x3x3 convolution, fp32,
batch 1, at shapes where PyTorch's heuristic takes the im2col ``slow_conv3d`` path (the
demo's and small patches' widths) and one where it already runs oneDNN (the paper's
full-resolution level, where the engine keeps PyTorch's backward):

* ``pytorch`` -- ``F.conv3d`` with autograd;
* ``engine``  -- :func:`patchddm_fast.kernels.conv3d_cpu.conv3d` (oneDNN forward; backward as
  forward convolutions where PyTorch would take the slow path).

The engine benchmark of each case stores its speed-up over PyTorch (ratio of medians in the
same session) in ``extra_info`` and checks the gradients against PyTorch's first.
Run: ``pytest benchmarks/test_bench_cpu_conv.py --benchmark-only`` (about 30 s).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from patchddm_fast.kernels import conv3d_cpu as cpu_conv

CASES = {  # (cin, cout, edge)
    "16->16 at 32^3": (16, 16, 32),
    "16->32 at 32^3": (16, 32, 32),
    "32->32 at 16^3": (32, 32, 16),
    "29->29 at 64^3": (29, 29, 64),
}
ROUNDS = 5
_medians: dict[tuple[str, str], float] = {}


def _step(impl: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor):
    x, w, b = (v.detach().requires_grad_() for v in (x, w, b))
    conv = F.conv3d if impl == "pytorch" else (lambda x_, w_, b_, s, p: cpu_conv.conv3d(x_, w_, b_, [s] * 3, [p] * 3))
    conv(x, w, b, 1, 1).backward(g)
    return x.grad, w.grad, b.grad


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("impl", ["pytorch", "engine"])  # engine last: its ratio uses pytorch's median
@pytest.mark.parametrize("case", list(CASES))
def test_conv3d_forward_backward(benchmark, bench_results, case, impl):
    cin, cout, edge = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, edge, edge, edge, generator=gen)
    w = torch.randn(cout, cin, 3, 3, 3, generator=gen) * 0.1
    b = torch.randn(cout, generator=gen)
    g = torch.randn(1, cout, edge, edge, edge, generator=gen)
    if impl == "engine":
        for got, want in zip(_step("engine", x, w, b, g), _step("pytorch", x, w, b, g)):
            assert (got - want).norm() <= 1e-5 * want.norm()
    times = []

    def timed():
        start = time.perf_counter()
        _step(impl, x, w, b, g)
        times.append(time.perf_counter() - start)

    benchmark.group = f"conv3d fwd+bwd {case}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median = statistics.median(times[1:] if len(times) > ROUNDS else times)
    _medians[(case, impl)] = median
    benchmark.extra_info.update(median_s=median, slow_path=cpu_conv.aten_takes_slow_path(x, w))
    if impl == "engine" and (case, "pytorch") in _medians:
        benchmark.extra_info["speedup_vs_pytorch"] = _medians[(case, "pytorch")] / median
        bench_results["conv"].append(dict(case=case, slow_path=cpu_conv.aten_takes_slow_path(x, w),
                                          pytorch_s=_medians[(case, "pytorch")], engine_s=median))
