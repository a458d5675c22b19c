"""The C++ CPU kernels (csrc/patchddm_cpu_ops.cpp) against a float64 PyTorch reference.

Reference: tests/gn_silu_reference.py in float64 (F.group_norm, F.silu), gradients by
autograd -- an independent implementation.  Errors are relative, with tolerances per output dtype:

* fp32 outputs (and the fp32 statistics/parameter gradients of every dtype): 1e-5
  (the kernels compute in fp32 with a ~20-ulp polynomial exp in the sigmoid; measured
  errors are 1e-7 .. 1e-6);
* fp16 outputs: 1e-3 (rounding to 11 significant bits: at most 4.9e-4 of max|ref|);
* bf16 outputs: 8e-3 (rounding to 8 significant bits: at most 3.9e-3 of max|ref|).

"Relative" is max|err| / max|ref| per tensor, which also catches an element the kernel
never wrote (the outputs are allocated inside the op, so they cannot be poisoned
beforehand; a missed element holds whatever memory held, and fails this check).
dbias_in is exactly zero in exact arithmetic when a group has one channel, so its error
is measured against its condition scale sum_s |d loss / d(x + bias_in)|.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from gn_silu_reference import gn_silu_reference

from patchddm_fast import kernels as ops
from patchddm_fast.kernels import composite, cpu_ext

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TOL_F32 = 1e-5
EPS = 1e-5
CL = torch.channels_last_3d


@pytest.fixture(scope="module")
def ext():
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the extension cannot be built here")
    assert cpu_ext.available(), f"C++ extension failed to build: {cpu_ext.build_info()}"
    return cpu_ext


def make_inputs(shape, groups, dtype, layout, with_bias_in, seed, wdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    # per-channel offsets and a common offset: group statistics are far from (0, 1)
    x = torch.randn(shape, generator=g) * 1.5 + 0.7 + 0.5 * torch.randn(1, c, 1, 1, 1, generator=g)
    x = x.to(dtype).contiguous(memory_format=layout)
    w = (1.0 + 0.3 * torch.randn(c, generator=g)).to(wdtype)
    b = (0.2 * torch.randn(c, generator=g)).to(wdtype)
    bin_ = (0.8 * torch.randn(n, c, generator=g)).to(wdtype) if with_bias_in else None
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=layout)
    return x, w, b, bin_, dy


def reference(x, w, b, bin_, dy, groups):
    """float64 forward, statistics and autograd gradients."""
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_()
    bd = b.double().requires_grad_()
    bind = bin_.double().requires_grad_() if bin_ is not None else None
    leaves = [t for t in (xd, wd, bd, bind) if t is not None]
    y = gn_silu_reference(xd, wd, bd, groups, EPS, bind)
    grads = torch.autograd.grad(y, leaves, dy.double())
    v = xd.detach() if bind is None else xd.detach() + bind.detach()[:, :, None, None, None]
    flat = v.reshape(x.shape[0], groups, -1)
    mean = flat.mean(-1)
    rstd = 1.0 / torch.sqrt(flat.var(-1, unbiased=False) + EPS)
    # gradient w.r.t. the pre-norm input x + bias_in (= w.r.t. x), for the dbias_in condition scale
    dv = grads[0]
    return y.detach(), mean, rstd, grads, dv


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values in output"
    return ((actual.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_case(ext, shape, groups, dtype, layout, with_bias_in, seed, wdtype=torch.float32):
    x, w, b, bin_, dy = make_inputs(shape, groups, dtype, layout, with_bias_in, seed, wdtype)
    x_before = x.clone()
    y_ref, mean_ref, rstd_ref, grads_ref, dv_ref = reference(x, w, b, bin_, dy, groups)
    tol = TOL[dtype]

    y, mean, rstd = ext.gn_silu_forward(x, w, b, bin_, groups, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=layout)
    assert mean.dtype == torch.float32 and mean.shape == (shape[0], groups)
    assert rstd.dtype == torch.float32 and rstd.shape == (shape[0], groups)
    assert rel_err(y, y_ref) < tol
    std_ref = 1.0 / rstd_ref
    assert ((mean.double() - mean_ref).abs() / (mean_ref.abs() + std_ref)).max() < TOL_F32
    assert ((rstd.double() - rstd_ref).abs() / rstd_ref).max() < TOL_F32

    dx, dw, db, dbin = ext.gn_silu_backward(dy, x, w, b, bin_, mean, rstd, groups)
    assert torch.equal(x, x_before), "input modified"
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=layout)
    assert dw.dtype == wdtype and db.dtype == wdtype and dw.shape == db.shape == (shape[1],)
    assert rel_err(dx, grads_ref[0]) < tol
    wtol = TOL_F32 if wdtype == torch.float32 else TOL[wdtype]
    assert rel_err(dw, grads_ref[1]) < wtol
    assert rel_err(db, grads_ref[2]) < wtol
    if bin_ is None:
        assert dbin is None
    else:
        assert dbin.shape == bin_.shape and dbin.dtype == bin_.dtype
        scale = dv_ref.abs().flatten(2).sum(-1)  # sum_s |dL/dv| per (n, c)
        err = (dbin.double() - grads_ref[3]).abs() / scale
        assert err.max() < wtol


# group sizes of the network: 1, 3 and 4 channels per group
GROUPINGS = [(5, 5), (9, 3), (8, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["ncdhw", "cl3d"])
@pytest.mark.parametrize("channels,groups", GROUPINGS, ids=["cpg1", "cpg3", "cpg4"])
@pytest.mark.parametrize("with_bias_in", [False, True], ids=["nobias", "bias_in"])
def test_gn_silu_small_odd_shapes(ext, dtype, layout, channels, groups, with_bias_in):
    seed = zlib.crc32(f"{dtype}{layout}{channels}{with_bias_in}".encode())  # distinct, reproducible
    check_case(ext, (2, channels, 3, 5, 7), groups, dtype, layout, with_bias_in, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["ncdhw", "cl3d"])
def test_gn_silu_multi_block(ext, dtype, layout):
    """A plane larger than one work item (65536 elements) and than one chunk, with tails."""
    check_case(ext, (1, 3, 41, 43, 39), 1, dtype, layout, True, seed=11)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["ncdhw", "cl3d"])
@pytest.mark.parametrize("channels,groups", [(29, 29), (87, 29), (116, 29), (1000, 250)],
                         ids=["29", "87", "116", "1000"])
def test_gn_silu_network_widths(ext, layout, channels, groups):
    """The network's widths with its 29 groups (channels-last rows of 29/87/116 are not a
    multiple of the SIMD width), and a row longer than one cache chunk (1000)."""
    check_case(ext, (1, channels, 3, 5, 6), groups, torch.bfloat16, layout, True, seed=channels)


def test_gn_silu_large_offset_is_stable(ext):
    """|mean| = 1000 * std: an E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    x, w, b, bin_, dy = make_inputs((1, 4, 9, 10, 11), 2, torch.float32, torch.contiguous_format, True, 5)
    x = (x - 0.7) * 0.01 + 10.0
    _, mean_ref, rstd_ref, _, _ = reference(x, w, b, bin_, dy, 2)
    y, mean, rstd = ext.gn_silu_forward(x, w, b, bin_, 2, EPS)
    assert ((rstd.double() - rstd_ref).abs() / rstd_ref).max() < 1e-4
    assert ((mean.double() - mean_ref).abs() / mean_ref.abs()).max() < 1e-6


def test_gn_silu_reduced_precision_parameters(ext):
    """fp16 weight/bias/bias_in: parameter gradients come back in the parameters' dtype."""
    check_case(ext, (2, 8, 3, 4, 5), 2, torch.float16, CL, True, seed=3, wdtype=torch.float16)


def test_gn_silu_mixed_and_strided_layouts(ext):
    """dy in the other layout than x, and a non-dense x (a strided view): still correct."""
    x, w, b, bin_, dy = make_inputs((2, 6, 5, 4, 6), 2, torch.float32, CL, True, 9)
    y_ref, _, _, grads_ref, _ = reference(x, w, b, bin_, dy, 2)
    y, mean, rstd = ext.gn_silu_forward(x, w, b, bin_, 2, EPS)
    dx, _, _, _ = ext.gn_silu_backward(dy.contiguous(), x, w, b, bin_, mean, rstd, 2)
    assert dx.is_contiguous(memory_format=CL)
    assert rel_err(dx, grads_ref[0]) < TOL_F32

    big = torch.randn(2, 6, 10, 4, 6)
    xs = big[:, :, ::2]
    assert not xs.is_contiguous() and not xs.is_contiguous(memory_format=CL)
    y_ref, _, _, grads_ref, _ = reference(xs, w, b, bin_, dy, 2)
    y, mean, rstd = ext.gn_silu_forward(xs, w, b, bin_, 2, EPS)
    assert rel_err(y, y_ref) < TOL_F32
    dx, _, _, _ = ext.gn_silu_backward(dy, xs, w, b, bin_, mean, rstd, 2)
    assert rel_err(dx, grads_ref[0]) < TOL_F32


def test_results_do_not_depend_on_thread_count(ext):
    """Work items and reduction order are fixed by the shape: bitwise equal for 1 and 2 threads."""
    x, w, b, bin_, dy = make_inputs((1, 6, 40, 41, 42), 3, torch.float32, CL, True, 13)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mean, rstd = ext.gn_silu_forward(x, w, b, bin_, 3, EPS)
            outs.append((y, mean, rstd, *ext.gn_silu_backward(dy, x, w, b, bin_, mean, rstd, 3)))
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


def test_gn_silu_bad_arguments(ext):
    x = torch.randn(1, 6, 2, 2, 2)
    w, b = torch.ones(6), torch.zeros(6)
    with pytest.raises(RuntimeError, match="groups=4"):
        ext.gn_silu_forward(x, w, b, None, 4, EPS)
    with pytest.raises(RuntimeError, match="bias_in must have shape"):
        ext.gn_silu_forward(x, w, b, torch.zeros(6), 3, EPS)
    with pytest.raises(RuntimeError, match="5-D"):
        ext.gn_silu_forward(x[0], w, b, None, 3, EPS)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ext.gn_silu_forward(x, torch.ones(5), b, None, 3, EPS)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ext.gn_silu_forward(x.double(), w, b, None, 3, EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["ncdhw", "cl3d"])
def test_average_skip_in_place(ext, dtype, layout):
    g = torch.Generator().manual_seed(21)
    shape = (2, 5, 7, 9, 11)  # 6930 elements: one full 4096 chunk and a ragged tail
    h = (torch.randn(shape, generator=g) * 3).to(dtype).contiguous(memory_format=layout)
    skip = (torch.randn(shape, generator=g) * 3).to(dtype).contiguous(memory_format=layout)
    expected = ((h.double() + skip.double()) / 2).to(dtype)  # exact sum, one rounding
    skip_before = skip.clone()
    ptr = h.data_ptr()
    out = ext.average_skip_(h, skip)
    assert out.data_ptr() == ptr and h.data_ptr() == ptr  # written into h, no new tensor
    assert h.is_contiguous(memory_format=layout)
    assert torch.equal(skip, skip_before), "skip must never be written"
    if dtype == torch.bfloat16:  # fp32 sum then bf16 rounding: within one bf16 rounding
        assert ((h.double() - expected.double()).abs() <= expected.double().abs() * 2**-8).all()
    else:  # the fp32 sum of two fp32/fp16 values rounds exactly like the float64 one
        assert torch.equal(h, expected)


def test_average_skip_mixed_layout_and_views(ext):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, 3, 4, 5, 6, generator=g)
    skip = torch.randn(1, 3, 4, 5, 6, generator=g).contiguous(memory_format=CL)
    expected = (h + skip) / 2
    ext.average_skip_(h, skip)
    assert torch.equal(h, expected)

    base = torch.randn(1, 3, 8, 5, 6, generator=g)
    view = base[:, :, ::2]  # not dense: falls back to two in-place passes, still in place
    other = base[:, :, 1::2].clone()
    expected = (view + other) / 2
    untouched = base[:, :, 1::2].clone()
    ext.average_skip_(view, other)
    assert torch.equal(base[:, :, ::2], expected)
    assert torch.equal(base[:, :, 1::2], untouched)
    with pytest.raises(RuntimeError, match="does not match skip shape"):
        ext.average_skip_(h, skip[:, :2])


def test_build_failure_warns_once(monkeypatch, tmp_path):
    """No usable compiler: available() is False, one warning, the ops raise clearly."""
    monkeypatch.setattr(cpu_ext, "_state", {"loaded": None, "error": None, "warned": False, "info": {}})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv(cpu_ext.ENV_DISABLE, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_ext.available() is False
        assert cpu_ext.available() is False
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_ext.average_skip_(torch.zeros(2), torch.zeros(2))
    ours = [w for w in caught if "C++ CPU extension" in str(w.message)]
    assert len(ours) == 1
    assert issubclass(ours[0].category, RuntimeWarning)
    assert "composite" in str(ours[0].message) and "no-such-compiler" in str(ours[0].message)
    assert "error" in cpu_ext.build_info()


def test_compile_error_warns_once(monkeypatch, tmp_path):
    """A source that does not compile: the compiler's message reaches the one warning."""
    (tmp_path / cpu_ext.SOURCE_NAME).write_text("#error deliberately broken\n")
    monkeypatch.setattr(cpu_ext, "_state", {"loaded": None, "error": None, "warned": False, "info": {}})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu_ext.ENV_SOURCE, str(tmp_path))
    monkeypatch.delenv(cpu_ext.ENV_DISABLE, raising=False)
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_ext.available() and not cpu_ext.available()
    ours = [w for w in caught if "C++ CPU extension" in str(w.message)]
    assert len(ours) == 1 and "deliberately broken" in str(ours[0].message)
    assert not any((tmp_path / "cache").rglob("*.so")), "a failed build must not leave a library"


def test_disabled_by_environment_is_silent(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_state", {"loaded": None, "error": None, "warned": False, "info": {}})
    monkeypatch.setenv(cpu_ext.ENV_DISABLE, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_ext.available() is False


def test_import_does_not_build(tmp_path):
    """Importing the package (and this module) compiles nothing: building waits for first use."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    code = (
        "import patchddm_fast, patchddm_fast.kernels.cpu_ext as m\n"
        "assert m._state['loaded'] is None, m._state\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "something was built at import time"


def test_kernels_serve_the_ops_schemas(ext):
    """The C++ kernels are the CPU implementation of patchddm::* (no namespace of their
    own), and the CPU setting still chooses between them and the composite after loading."""
    x, w, b, bin_, _ = make_inputs((1, 6, 3, 4, 5), 3, torch.float32, CL, True, 17)
    direct = ext.gn_silu_forward(x, w, b, bin_, 3, EPS)
    with ops.cpu_backend("cpp"):
        through_op = torch.ops.patchddm.gn_silu_fwd(x, w, b, bin_, 3, EPS)
    with ops.cpu_backend("composite"):
        through_composite = torch.ops.patchddm.gn_silu_fwd(x, w, b, bin_, 3, EPS)
    expected_composite = composite.gn_silu_forward(x, w, b, bin_, 3, EPS)
    for a, c, d, e in zip(direct, through_op, through_composite, expected_composite):
        assert torch.equal(a, c) and torch.equal(d, e)
    assert not torch.equal(direct[0], through_composite[0])  # two implementations really ran
    debug = torch._C._dispatch_dump("patchddm::gn_silu_fwd")
    assert "patchddm_cpu_ops.cpp" in debug
