"""In-place averaging skip and residual add, through the Triton interpreter and the composite.

Expected values are computed independently in float64 from copies of the inputs taken
before the in-place call; every element of ``h`` is compared, so an element the kernel
fails to write (it keeps its random old value) fails.  Tolerances: fp32 1e-6 relative
(one fp32 rounding), fp16 1e-3 (one fp16 rounding, unit roundoff 4.9e-4).
"""
from __future__ import annotations

import pytest
import torch

from patchddm_fast import kernels as ops
from patchddm_fast.kernels import average_skip as skip_mod

BACKENDS = ("triton-interpret", "composite")
TOL = {torch.float32: 1e-6, torch.float16: 1e-3}
OPS = {"average": (ops.average_skip_, 0.5), "residual": (ops.residual_add_, 1.0)}


def _inputs(shape, dtype, seed, h_layout="cf", skip_layout="cf"):
    g = torch.Generator().manual_seed(seed)
    fmt = {"cf": torch.contiguous_format, "cl": torch.channels_last_3d}
    h = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt[h_layout])
    skip = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(
        memory_format=fmt[skip_layout])
    return h, skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", sorted(OPS))
@pytest.mark.parametrize("dtype,h_layout,skip_layout", [
    (torch.float32, "cf", "cf"), (torch.float16, "cl", "cl"), (torch.float32, "cl", "cf"),
])
def test_values_in_place_and_skip_untouched(backend, which, dtype, h_layout, skip_layout):
    fn, scale = OPS[which]
    h, skip = _inputs((2, 5, 3, 7, 11), dtype, seed=len(which), h_layout=h_layout,
                      skip_layout=skip_layout)
    expected = scale * (h.double() + skip.double())
    skip_before, ptr, stride = skip.clone(), h.data_ptr(), h.stride()
    with ops.cpu_backend(backend):
        out = fn(h, skip)
    assert out is h and h.data_ptr() == ptr and h.stride() == stride
    assert torch.equal(skip, skip_before)
    err = (h.double() - expected).abs().max() / expected.abs().max()
    assert err <= TOL[dtype], f"max relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", sorted(OPS))
def test_gradients_and_nothing_saved(backend, which):
    fn, scale = OPS[which]
    a = torch.randn(2, 4, 3, 3, 5, requires_grad=True)
    skip = torch.randn(2, 4, 3, 3, 5, requires_grad=True)
    saved = []
    with ops.cpu_backend(backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        h = a * 3.0  # a non-leaf decoder tensor (mul saves the scalar only, not h)
        n_before = len(saved)
        out = fn(h, skip)
    assert len(saved) == n_before  # the skip op saves nothing
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(skip.grad, scale * g, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, 3.0 * scale * g, rtol=1e-6, atol=0)


def test_writing_into_a_saved_tensor_is_caught_by_autograd():
    """The documented unsafe case: h saved by its producer -> error at backward, not a wrong grad."""
    x = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    h = torch.sigmoid(x)  # sigmoid saves its output h
    ops.average_skip_(h, torch.randn(1, 2, 3, 3, 3))
    with pytest.raises(RuntimeError, match="inplace"):
        h.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h, skip = _inputs((2, 3, 2, 3, 5), torch.float32, seed=9)
    with ops.cpu_backend(backend):
        torch.library.opcheck(skip_mod.average_skip_op, (h, skip))
        torch.library.opcheck(skip_mod.residual_add_op, (h, skip))


def test_meta_device_allocates_nothing():
    h = torch.empty(2, 3, 4, 4, 4, device="meta", requires_grad=False)
    out = ops.average_skip_(h, torch.empty_like(h))
    assert out is h


def test_validation_errors():
    h = torch.randn(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        ops.average_skip_(h, torch.randn(1, 2, 3, 3, 4))
    with pytest.raises(TypeError, match="floating"):
        ops.residual_add_(h.long(), h.long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("which", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_compiled_kernel(which, dtype):
    fn, scale = OPS[which]
    h, skip = (t.cuda() for t in _inputs((2, 29, 13, 17, 19), dtype, seed=3))
    expected = scale * (h.double() + skip.double())
    fn(h, skip)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((h.double() - expected).abs().max() / expected.abs().max()).item() <= tol
