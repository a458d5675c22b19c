"""Fused GroupNorm -> SiLU custom op against a float64 PyTorch reference.

The Triton kernels run through Triton's interpreter on CPU (``set_cpu_backend(
"triton-interpret")``; no TRITON_INTERPRET environment variable is involved, so this
file does not affect other test files).  Every tensor the launchers allocate is
filled with NaN first (``poisoned_outputs``), so an element a kernel forgets to write
fails the comparison.  Shapes are tiny and odd; the interpreter plans 3 chunks per
sample, so the split reduction and its ragged last chunk are always exercised.

Tolerances (relative error = ||got - ref||_2 / ||ref||_2, and max |got - ref| /
max |ref|): fp32 outputs 1e-5 (fp32 arithmetic, observed ~2e-7); fp16 outputs y and
dx 2e-3 (one fp16 rounding of the result, unit roundoff 4.9e-4, observed ~2e-4);
bf16 y and dx 1.6e-2 (unit roundoff 3.9e-3);
fp32 gradients of fp16 inputs (dweight, dbias, dbias_in) 1e-5 -- the reference sees
the very same fp16-rounded inputs, so only fp32 arithmetic error remains.  dbias_in is
a sum over space of dx that cancels (to exactly 0 when a group has one channel), so its
error is relative to the sum of |dx| instead of to itself.
"""
from __future__ import annotations

import pytest
import torch

from gn_silu_reference import gn_silu_reference
from patchddm_fast import kernels as ops
from patchddm_fast.kernels import backends
from patchddm_fast.kernels import composite
from patchddm_fast.kernels import cpu_ext
from patchddm_fast.kernels import gn_silu
from patchddm_fast.kernels._layout import poisoned_outputs

BACKENDS = ("triton-interpret", "composite")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_TOL_FP32 = 1e-5

# (shape, groups, dtype, channels_last, with bias_in): channels per group 1, 3 and 4
CASES = [
    ((2, 12, 3, 5, 7), 12, torch.float32, False, True),   # cpg 1
    ((2, 12, 3, 5, 7), 4, torch.float32, True, True),     # cpg 3, channels-last
    ((1, 12, 5, 3, 4), 3, torch.float16, False, False),   # cpg 4
    ((2, 9, 3, 3, 5), 3, torch.float16, True, True),      # cpg 3, fp16 channels-last
    ((1, 8, 4, 3, 5), 2, torch.float32, True, False),     # cpg 4, channels-last
    ((2, 6, 7, 1, 3), 6, torch.float16, False, True),     # cpg 1, fp16
    ((2, 8, 5, 7), 2, torch.float32, True, True),         # 4-D input, channels_last
    ((1, 6, 3, 4, 5), 2, torch.bfloat16, True, True),     # bf16 loads/stores (no tl.dot/atomics)
]


def rel_errors(got: torch.Tensor, ref: torch.Tensor, scale=None):
    """Relative L2 and max errors; ``scale`` (same shape, >= |ref|) replaces |ref| as the
    denominator for sums that cancel (e.g. sum of |terms| for a gradient that is a sum)."""
    err = got.double() - ref
    scale = ref.abs() if scale is None else scale
    return (err.norm() / scale.norm()).item(), (err.abs().max() / scale.abs().max()).item()


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, scale=None) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten?) elements"
    l2, mx = rel_errors(got, ref, scale)
    assert l2 <= tol and mx <= 2 * tol, f"{name}: relative error L2 {l2:.2e} max {mx:.2e} > {tol:.0e}"


def make_inputs(shape, dtype, channels_last, with_bias_in, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5 + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    w = torch.randn(c, generator=g, dtype=torch.float64).float()
    b = torch.randn(c, generator=g, dtype=torch.float64).float()
    bias_in = torch.randn(n, c, generator=g, dtype=torch.float64).float() if with_bias_in else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, bias_in, dy


def run_fused(x, w, b, bias_in, dy, groups, backend):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (x, w, b, bias_in)]
    with ops.cpu_backend(backend), poisoned_outputs():
        y = ops.group_norm_silu(leaves[0], leaves[1], leaves[2], groups, 1e-5, leaves[3])
        y.backward(dy)
    return y.detach(), leaves


def run_reference(x, w, b, bias_in, dy, groups):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in (x, w, b, bias_in)]
    y = gn_silu_reference(leaves[0], leaves[1], leaves[2], groups, 1e-5, leaves[3])
    y.backward(dy.double())
    return y.detach(), leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_float64(backend, case):
    shape, groups, dtype, channels_last, with_bias_in = CASES[case]
    x, w, b, bias_in, dy = make_inputs(shape, dtype, channels_last, with_bias_in, seed=case)
    y, got = run_fused(x, w, b, bias_in, dy, groups, backend)
    y_ref, ref = run_reference(x, w, b, bias_in, dy, groups)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close("y", y, y_ref, tol)
    assert got[0].grad.dtype == dtype and got[0].grad.stride() == x.stride()
    assert_close("dx", got[0].grad, ref[0].grad, tol)
    assert_close("dweight", got[1].grad, ref[1].grad, GRAD_TOL_FP32)
    assert_close("dbias", got[2].grad, ref[2].grad, GRAD_TOL_FP32)
    if with_bias_in:
        # dbias_in[n, c] = sum over space of dx[n, c]: a cancelling sum (exactly 0 with one
        # channel per group), so its error is measured against the sum of |dx|.
        spatial = tuple(range(2, x.dim()))
        scale = ref[0].grad.abs().sum(spatial)
        assert_close("dbias_in", got[3].grad, ref[3].grad, GRAD_TOL_FP32, scale)


def test_interpreter_backend_runs_the_triton_launchers(monkeypatch):
    calls = []
    for name, table in (("forward", gn_silu._FORWARD), ("backward", gn_silu._BACKWARD)):
        real = table["triton"]
        monkeypatch.setitem(table, "triton", lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, w, b, bias_in, dy = make_inputs((1, 4, 3, 2, 3), torch.float32, False, True, seed=7)
    run_fused(x, w, b, bias_in, dy, 2, "triton-interpret")
    assert calls == ["forward", "backward"]
    calls.clear()
    run_fused(x, w, b, bias_in, dy, 2, "composite")
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_are_stable_for_a_large_mean(backend):
    """mean 1e4, std 2: E[x^2] - E[x]^2 in fp32 loses the variance (checked below); the
    chunked Welford/Chan statistics must stay at fp32 accuracy."""
    x, w, b, _, _ = make_inputs((1, 6, 6, 5, 7), torch.float32, False, False, seed=3, offset=1e4)
    with ops.cpu_backend(backend), poisoned_outputs():
        _, mean, rstd = gn_silu.gn_silu_fwd(x, w, b, None, 2, 1e-5)
    z = x.double().reshape(1, 2, -1)
    mean_ref = z.mean(-1)
    rstd_ref = (z.var(-1, unbiased=False) + 1e-5).rsqrt()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (1, 2)
    assert ((mean.double() - mean_ref).abs() / mean_ref.abs()).max() < 1e-6
    assert ((rstd.double() - rstd_ref).abs() / rstd_ref).max() < 1e-5
    zf = z.float()
    naive_var = (zf * zf).mean(-1) - zf.mean(-1) ** 2
    naive_rstd = (naive_var.clamp_min(0) + 1e-5).rsqrt().double()
    assert ((naive_rstd - rstd_ref).abs() / rstd_ref).max() > 1e-3  # the test can tell


def _meta(t):
    return (tuple(t.shape), t.dtype, t.stride())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["cf", "cl", "strided"])
def test_fake_implementation_allocates_what_the_real_one_does(backend, layout):
    x, w, b, bias_in, dy = make_inputs((2, 6, 3, 4, 5), torch.float16, layout == "cl", True, seed=5)
    if layout == "strided":  # in no kernel layout: the ops make a contiguous copy
        x = x.transpose(3, 4).contiguous().transpose(3, 4)
    with ops.cpu_backend(backend):
        real_f = gn_silu.gn_silu_fwd(x, w, b, bias_in, 3, 1e-5)
        real_b = gn_silu.gn_silu_bwd(dy, x, w, b, bias_in, real_f[1], real_f[2], 3)
        real_b0 = gn_silu.gn_silu_bwd(dy, x, w, b, None, real_f[1], real_f[2], 3)
    to_meta = lambda t: t.to("meta")  # noqa: E731 -- .to keeps strides
    mx, mw, mb, mbi, mdy = map(to_meta, (x, w, b, bias_in, dy))
    fake_f = gn_silu.gn_silu_fwd(mx, mw, mb, mbi, 3, 1e-5)
    fake_b = gn_silu.gn_silu_bwd(mdy, mx, mw, mb, mbi, fake_f[1], fake_f[2], 3)
    fake_b0 = gn_silu.gn_silu_bwd(mdy, mx, mw, mb, None, fake_f[1], fake_f[2], 3)
    assert [_meta(t) for t in real_f] == [_meta(t) for t in fake_f]
    assert [_meta(t) for t in real_b] == [_meta(t) for t in fake_b]
    assert [_meta(t) for t in real_b0] == [_meta(t) for t in fake_b0]
    assert real_f[1].shape == (2, 3) and real_f[1].dtype == torch.float32
    assert real_b0[3].numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b, bias_in, dy = make_inputs((2, 6, 3, 2, 5), torch.float32, False, True, seed=11)
    xl = x.to(memory_format=torch.channels_last_3d)
    with ops.cpu_backend(backend):
        for args in [(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(),
                      bias_in.requires_grad_(), 3, 1e-5),
                     (xl, w, b, None, 2, 1e-5)]:
            torch.library.opcheck(gn_silu.gn_silu_fwd, args)
        _, mean, rstd = gn_silu.gn_silu_fwd(x, w, b, bias_in, 3, 1e-5)
        torch.library.opcheck(gn_silu.gn_silu_bwd, (dy, x.detach(), w.detach(), b.detach(),
                                                   bias_in.detach(), mean, rstd, 3))


def test_backward_saves_only_input_bias_in_and_statistics():
    x, w, b, bias_in, _ = make_inputs((1, 6, 3, 4, 5), torch.float32, False, True, seed=2)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.group_norm_silu(x, w.requires_grad_(), b.requires_grad_(), 3, bias_in=bias_in)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([tuple(x.shape), (6,), (6,), (1, 6), (1, 3), (1, 3)])


def test_validation_errors_name_the_argument():
    x = torch.randn(2, 6, 3, 3, 3)
    w, b = torch.ones(6), torch.zeros(6)
    with pytest.raises(ValueError, match="groups"):
        ops.group_norm_silu(x, w, b, 4)
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm_silu(x, torch.ones(5), b, 3)
    with pytest.raises(ValueError, match="bias_in"):
        ops.group_norm_silu(x, w, b, 3, bias_in=torch.zeros(6))
    with pytest.raises(ValueError, match="empty"):
        ops.group_norm_silu(x[:0], w, b, 3)
    with pytest.raises(TypeError, match="floating"):
        ops.group_norm_silu(x.long(), w, b, 3)


def test_float64_runs_the_composite_on_every_backend():
    x, w, b, bias_in, _ = make_inputs((1, 4, 2, 3, 3), torch.float64, False, True, seed=4)
    with ops.cpu_backend("triton-interpret"):
        y = ops.group_norm_silu(x, w.double(), b.double(), 2, bias_in=bias_in.double())
    ref = gn_silu_reference(x, w.double(), b.double(), 2, 1e-5, bias_in.double())
    assert y.dtype == torch.float64 and rel_errors(y, ref)[0] < 1e-12


class TestCpuBackendSelection:
    def test_default_and_environment(self, monkeypatch):
        monkeypatch.setattr(backends, "_selected", None)
        for var in (backends.ENV_BACKEND, backends.ENV_INTERPRET, "TRITON_INTERPRET"):
            monkeypatch.delenv(var, raising=False)
        assert backends.get_cpu_backend() == "auto"
        monkeypatch.setenv(backends.ENV_INTERPRET, "1")
        assert backends.get_cpu_backend() == "triton-interpret"
        monkeypatch.setenv(backends.ENV_BACKEND, "composite")
        assert backends.get_cpu_backend() == "composite"
        monkeypatch.setenv(backends.ENV_BACKEND, "fortran")
        with pytest.raises(ValueError, match=backends.ENV_BACKEND):
            backends.get_cpu_backend()

    def test_setter_and_context_manager(self, monkeypatch):
        monkeypatch.setattr(backends, "_selected", None)
        monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
        ops.set_cpu_backend("composite")
        with ops.cpu_backend("triton-interpret"):
            assert ops.get_cpu_backend() == "triton-interpret"
        assert ops.get_cpu_backend() == "composite"
        ops.set_cpu_backend(None)
        with pytest.raises(ValueError, match="set_cpu_backend"):
            ops.set_cpu_backend("gpu")

    def test_cpp_routing(self, monkeypatch):
        """'cpp' runs the C++ kernels when they are available and fails clearly when not."""
        monkeypatch.setattr(cpu_ext, "available", lambda: False)
        with ops.cpu_backend("cpp"), pytest.raises(RuntimeError, match="cpu_ext"):
            ops.resolve_cpu_backend()
        with ops.cpu_backend("auto"):
            assert ops.resolve_cpu_backend() == "composite"

        calls = []

        def fake_forward(*args):
            calls.append("fwd")
            return composite.gn_silu_forward(*args)

        def fake_backward(*args):
            calls.append("bwd")
            return composite.gn_silu_backward(*args)

        monkeypatch.setattr(cpu_ext, "available", lambda: True)
        monkeypatch.setitem(gn_silu._FORWARD, "cpp", fake_forward)
        monkeypatch.setitem(gn_silu._BACKWARD, "cpp", fake_backward)
        x, w, b, _, _ = make_inputs((1, 4, 2, 2, 3), torch.float32, False, False, seed=1)
        with ops.cpu_backend("auto"):
            ops.group_norm_silu(x.requires_grad_(), w, b, 2).sum().backward()
        assert calls == ["fwd", "bwd"]

    def test_one_schema_per_op(self):
        """Every op is one patchddm:: schema with a CPU and a CUDA kernel of its own."""
        for name in ("gn_silu_fwd", "gn_silu_bwd", "average_skip_", "residual_add_"):
            op = f"patchddm::{name}"
            for key in ("CPU", "CUDA", "Meta"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [29, 87, 116])
def test_cuda_compiled_kernels_match_float64(dtype, channels_last, channels):
    """The network's channel configurations (29 groups: 1, 3, 4 channels each) on the GPU."""
    x, w, b, bias_in, dy = make_inputs((2, channels, 9, 10, 11), dtype, channels_last, True,
                                       seed=channels)
    x, w, b, bias_in, dy = (t.cuda() for t in (x, w, b, bias_in, dy))
    y, got = run_fused(x, w, b, bias_in, dy, 29, "auto")
    y_ref, ref = run_reference(x, w, b, bias_in, dy, 29)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert y.stride() == x.stride() and got[0].grad.stride() == x.stride()
    assert_close("y", y, y_ref, tol)
    assert_close("dx", got[0].grad, ref[0].grad, tol)
    assert_close("dweight", got[1].grad, ref[1].grad, 1e-4)
    assert_close("dbias", got[2].grad, ref[2].grad, 1e-4)
    assert_close("dbias_in", got[3].grad, ref[3].grad, 1e-4, ref[0].grad.abs().sum((2, 3, 4)))
