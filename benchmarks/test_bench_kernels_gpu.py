"""GPU speed of the Triton kernels against the DRAM roofline, eager PyTorch and torch.compile.

Skipped without a CUDA GPU.  Shapes are the paper network's activations (batch 1):
29 channels at 256^3 (full-resolution level 0), 87 at 128^3, 116 at 64^3, 32^3 and 8^3,
in fp16 and bf16 (the training dtypes under autocast), contiguous; one channels-last
case.  GroupNorm has 29 groups and the time-embedding ``bias_in`` (as in a residual
block's second GroupNorm).

Roofline floor -- the DRAM bytes each op must move per element of x (e = 2 bytes for
fp16/bf16, 4 for fp32; per-channel/per-chunk side data is < 0.01 %):

============================  ==========  ==================================================
op                            bytes/elem  why
============================  ==========  ==================================================
group_norm_silu forward       3e          read x (statistics), read x (normalise), write y
group_norm_silu backward      5e          read x, dy (reductions); read x, dy, write dx
average_skip_ / residual_add_ 3e          read h, read skip, write h
============================  ==========  ==================================================

(A group of the network does not fit on chip -- 29 x 256^3 fp16 is 973 MB -- so x is
read twice; for small tensors that fit in L2 the second read may hit L2 and the
achieved "DRAM" bandwidth can exceed the roofline.)

Each benchmark records in ``extra_info``: median ms of the fused op, its achieved GB/s
(floor bytes / time), that as a fraction of the measured device-to-device copy
bandwidth (``roofline_GBps``, read+write of a 1 GiB buffer) and of the card's nominal
bandwidth where known, and the median ms of eager PyTorch and of ``torch.compile`` of
the reference composite (``patchddm_fast.model.backend.reference_group_norm_silu``:
GroupNorm in fp32, SiLU, cast back) for the same work.  Every case also checks the
fused result against the reference (relative L2 error < 1e-2 in fp16/bf16).
Run: ``pytest benchmarks/test_bench_kernels_gpu.py --benchmark-only -s``.
"""
from __future__ import annotations

import functools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmark: needs a CUDA GPU (none visible to torch)")

GROUPS = 29
CASES = {
    "29x256^3": (1, 29, 256, 256, 256),
    "87x128^3": (1, 87, 128, 128, 128),
    "116x64^3": (1, 116, 64, 64, 64),
    "116x32^3": (1, 116, 32, 32, 32),
    "116x8^3": (1, 116, 8, 8, 8),
}
CL_CASE = "87x128^3"  # also measured channels-last
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Nominal DRAM bandwidth (GB/s) by device-name substring, for reference only.
NOMINAL_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350,
                "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555,
                "L40S": 864, "RTX 4090": 1008, "A10": 600}


def _ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


@functools.lru_cache(maxsize=None)
def roofline_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def nominal_gbps():
    name = torch.cuda.get_device_name()
    return next((v for k, v in NOMINAL_GBPS.items() if k in name), None)


def _record(benchmark, ms: float, floor_bytes: int, eager_ms: float, compiled_ms: float) -> None:
    gbps = floor_bytes / (ms * 1e-3) / 1e9
    nominal = nominal_gbps()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), fused_ms=ms, achieved_GBps=gbps,
        roofline_GBps=roofline_gbps(), fraction_of_roofline=gbps / roofline_gbps(),
        fraction_of_nominal=None if nominal is None else gbps / nominal,
        eager_ms=eager_ms, compiled_ms=compiled_ms,
        speedup_vs_eager=eager_ms / ms, speedup_vs_compile=compiled_ms / ms)
    print(f"\n{benchmark.name}: {ms:.3f} ms, {gbps:.0f} GB/s = {gbps / roofline_gbps():.0%} of "
          f"copy roofline; eager {eager_ms:.3f} ms, torch.compile {compiled_ms:.3f} ms")


def _inputs(shape, dtype, channels_last=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = 1 + 0.1 * torch.randn(c, generator=g, device="cuda")
    b = 0.1 * torch.randn(c, generator=g, device="cuda")
    bias_in = torch.randn(n, c, generator=g, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    return x, w, b, bias_in, dy


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cases():
    for name in CASES:
        for dt in DTYPES:
            yield pytest.param(name, dt, False, id=f"{name}-{dt}")
    yield pytest.param(CL_CASE, "fp16", True, id=f"{CL_CASE}-fp16-channels_last")


@pytest.mark.parametrize("case,dtype,channels_last", list(_cases()))
def test_gn_silu_forward(benchmark, case, dtype, channels_last):
    from patchddm_fast.model.backend import reference_group_norm_silu
    from patchddm_fast.kernels.gn_silu import gn_silu_fwd

    x, w, b, bias_in, _ = _inputs(CASES[case], DTYPES[dtype], channels_last)
    fused = lambda: gn_silu_fwd(x, w, b, bias_in, GROUPS, 1e-5)  # noqa: E731
    eager = lambda: reference_group_norm_silu(x, w, b, GROUPS, 1e-5, bias_in)  # noqa: E731
    compiled_ref = torch.compile(reference_group_norm_silu)
    with torch.no_grad():
        assert _rel(fused()[0], eager()) < 1e-2
        ms, eager_ms = _ms(fused), _ms(eager)
        compiled_ms = _ms(lambda: compiled_ref(x, w, b, GROUPS, 1e-5, bias_in))
        benchmark.pedantic(lambda: (fused(), torch.cuda.synchronize()), rounds=5, iterations=1)
    _record(benchmark, ms, 3 * x.numel() * x.element_size(), eager_ms, compiled_ms)


@pytest.mark.parametrize("case,dtype,channels_last", list(_cases()))
def test_gn_silu_backward(benchmark, case, dtype, channels_last):
    from patchddm_fast.model.backend import reference_group_norm_silu
    from patchddm_fast.kernels.gn_silu import gn_silu_bwd, gn_silu_fwd

    x, w, b, bias_in, dy = _inputs(CASES[case], DTYPES[dtype], channels_last)
    with torch.no_grad():
        _, mean, rstd = gn_silu_fwd(x, w, b, bias_in, GROUPS, 1e-5)
    fused = lambda: gn_silu_bwd(dy, x, w, b, bias_in, mean, rstd, GROUPS)  # noqa: E731
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b, bias_in)]

    def backward_of(fn):
        y = fn(leaves[0], leaves[1], leaves[2], GROUPS, 1e-5, leaves[3])
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)

    eager = backward_of(reference_group_norm_silu)
    compiled = backward_of(torch.compile(reference_group_norm_silu))
    assert _rel(fused()[0], eager()[0]) < 1e-2
    ms, eager_ms, compiled_ms = _ms(fused), _ms(eager), _ms(compiled)
    benchmark.pedantic(lambda: (fused(), torch.cuda.synchronize()), rounds=5, iterations=1)
    _record(benchmark, ms, 5 * x.numel() * x.element_size(), eager_ms, compiled_ms)


@pytest.mark.parametrize("case,dtype", [pytest.param(c, d, id=f"{c}-{d}") for c in CASES for d in DTYPES])
def test_average_skip(benchmark, case, dtype):
    from patchddm_fast.model.backend import reference_average_skip
    from patchddm_fast.kernels.average_skip import average_skip_op

    h, _, _, _, skip = _inputs(CASES[case], DTYPES[dtype])
    expected = reference_average_skip(h, skip)
    average_skip_op(h, skip)
    assert _rel(h, expected) < 1e-2
    fused = lambda: average_skip_op(h, skip)  # noqa: E731 -- repeated in place: values irrelevant
    compiled_ref = torch.compile(reference_average_skip)
    ms = _ms(fused)
    eager_ms = _ms(lambda: reference_average_skip(h, skip))
    compiled_ms = _ms(lambda: compiled_ref(h, skip))
    benchmark.pedantic(lambda: (fused(), torch.cuda.synchronize()), rounds=5, iterations=1)
    _record(benchmark, ms, 3 * h.numel() * h.element_size(), eager_ms, compiled_ms)
