"""The fused GroupNorm-SiLU (-> x2 upsample) -> Conv3d (+ bias, + residual) op against float64.

The reference is built from ``F.group_norm``, ``F.silu``, ``F.interpolate`` and ``F.conv3d``
in float64 and differentiated by autograd.  Every case runs through the Triton kernels in
Triton's interpreter (``set_cpu_backend("triton-interpret")``) and through the CPU
composite, forward and every gradient, with every launcher allocation NaN-poisoned first
(``poisoned_outputs``), so an output element the kernel never writes fails the test.

Shapes are tiny and odd (the interpreter is slow): the M tiles (64 output pixels) are
ragged, Cout is padded in registers (29 -> 32, 87/116 -> 128, several Cout and Cin
chunks), Cin = 87 takes three K chunks.  The reference sees the very same (rounded)
inputs, so only the kernels' own arithmetic error remains.

Tolerances (relative: max |got - ref| / max |ref|): fp32 1e-5 forward (observed ~3e-7),
1e-5 gradients; fp16 outputs 4e-3 (one fp16 rounding of the output and of the activation
fed to the GEMM, unit roundoff 4.9e-4); bf16 3e-2 (unit roundoff 3.9e-3); half-precision
gradients of fp32 parameters 1e-3 (fp32 arithmetic on rounded inputs, but dy/dx round).
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from patchddm_fast import ops
from patchddm_fast.kernels import backends
from patchddm_fast.kernels import fused_conv3d
from patchddm_fast.kernels._layout import poisoned_outputs

BACKENDS = ("triton-interpret", "composite")
FWD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PARAM_GRAD_TOL_HALF = 1e-3


def reference(x, nw, nb, groups, w, b, bias_in, stride, upsample, residual):
    """float64 ground truth of ops.gn_silu_conv3d (autograd differentiates it)."""
    z = x if bias_in is None else x + bias_in[..., None, None, None]
    a = F.silu(F.group_norm(z, groups, nw, nb, 1e-5))
    if upsample:
        a = F.interpolate(a, scale_factor=2, mode="nearest")
    y = F.conv3d(a, w, b, stride, w.shape[2] // 2)
    return y if residual is None else y + residual


# (x shape, groups, cout, k, stride, upsample, bias_in, residual, conv_bias, dtype, channels_last)
CASES = [
    ((1, 29, 4, 5, 5), 29, 29, 3, 1, False, True, True, True, torch.float32, True),    # 2 ragged M tiles
    ((1, 29, 5, 4, 5), 29, 29, 3, 2, False, False, False, True, torch.float32, False),  # stride 2, contiguous
    ((1, 29, 2, 3, 3), 29, 29, 3, 1, True, True, False, True, torch.float32, True),     # x2 upsample
    ((2, 29, 3, 3, 4), 29, 87, 1, 1, False, False, True, False, torch.float32, True),   # 1x1x1 shortcut
    ((1, 87, 2, 3, 2), 29, 116, 3, 1, False, True, True, True, torch.float32, True),    # 3 K chunks, cpg 3
    ((1, 29, 3, 4, 5), 29, 29, 3, 1, False, True, True, True, torch.float16, True),
    ((1, 29, 2, 2, 3), 29, 29, 3, 1, True, False, True, True, torch.bfloat16, True),
]


def _case_id(case):
    shape, groups, cout, k, stride, up, bi, res, cb, dtype, cl = case
    parts = [f"c{shape[1]}-{cout}", f"k{k}s{stride}", str(dtype).split(".")[-1]]
    parts += [tag for tag, on in (("up", up), ("bias_in", bi), ("res", res), ("cbias", cb),
                                  ("cl", cl)) if on]
    return "-".join(parts)


def _inputs(case, seed=0):
    shape, groups, cout, k, stride, up, bi, res, cb, dtype, cl = case
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last_3d)
    params = dict(
        nw=1 + 0.3 * torch.randn(c, generator=g), nb=0.3 * torch.randn(c, generator=g),
        w=torch.randn(cout, c, k, k, k, generator=g) / (c * k ** 3) ** 0.5,
        b=0.3 * torch.randn(cout, generator=g) if cb else None,
        bias_in=(0.5 * torch.randn(n, c, generator=g)).to(dtype) if bi else None,
    )
    out_shape = fused_conv3d.output_shape(shape, cout, k, stride, up)
    residual = torch.randn(out_shape, generator=g).to(dtype) if res else None
    if residual is not None and cl:
        residual = residual.to(memory_format=torch.channels_last_3d)
    return x, params, residual, groups, stride, up


def _rel(got, ref, scale=None):
    scale = ref.abs().max() if scale is None else scale
    return ((got.double() - ref).abs().max() / scale.clamp_min(1e-30)).item()


def _check(name, got, ref, tol, scale=None):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten?) elements"
    err = _rel(got, ref, scale)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_gradients_match_float64(case, backend):
    x, p, residual, groups, stride, up = _inputs(case)
    dtype = x.dtype
    leaves = {"x": x, "residual": residual, **p}
    leaves = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in leaves.items()}
    with backends.cpu_backend(backend), poisoned_outputs():
        if backend == "triton-interpret":
            assert fused_conv3d._implementation(x, groups) == "triton"
        y = ops.gn_silu_conv3d(leaves["x"], leaves["nw"], leaves["nb"], groups, leaves["w"], leaves["b"],
                               bias_in=leaves["bias_in"], stride=stride, upsample=up,
                               residual=leaves["residual"])
        assert y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last_3d) == x.is_contiguous(
            memory_format=torch.channels_last_3d)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(y, [v for v in leaves.values() if v is not None], dy)
    ref_leaves = {k: (v.detach().double().requires_grad_(True) if v is not None else None)
                  for k, v in leaves.items()}
    ref = reference(ref_leaves["x"], ref_leaves["nw"], ref_leaves["nb"], groups, ref_leaves["w"],
                    ref_leaves["b"], ref_leaves["bias_in"], stride, up, ref_leaves["residual"])
    _check("y", y, ref.detach(), FWD_TOL[dtype])
    ref_grads = torch.autograd.grad(ref, [v for v in ref_leaves.values() if v is not None], dy.double())
    names = [k for k, v in leaves.items() if v is not None]
    ref_by_name = dict(zip(names, ref_grads))
    for name, got, want in zip(names, grads, ref_grads):
        half_param = dtype != torch.float32 and name in ("nw", "nb", "w", "b")
        tol = PARAM_GRAD_TOL_HALF if half_param else GRAD_TOL[dtype]
        assert got.dtype == leaves[name].dtype, name
        # dbias_in = sum over space of dx, which cancels (exactly 0 with one channel per
        # group): its error is measured against the sum of |dx| instead of against itself.
        scale = ref_by_name["x"].abs().sum((2, 3, 4)).max() if name == "bias_in" else None
        _check(f"d{name}", got, want, tol, scale)


def test_padding_belongs_to_the_activated_tensor():
    """A constant input normalises to 0 and silu(norm(x)) = silu(nb) != 0: the border taps of
    the zero padding must contribute 0, which distinguishes border from interior outputs."""
    x = torch.full((1, 29, 3, 3, 3), 2.0).to(memory_format=torch.channels_last_3d)
    x[0, :, 0, 0, 0] = 2.5  # non-constant so the variance is not 0
    nw, nb = torch.ones(29), torch.full((29,), 1.0)
    w = torch.ones(16, 29, 3, 3, 3)
    with backends.cpu_backend("triton-interpret"), poisoned_outputs():
        y = ops.gn_silu_conv3d(x, nw, nb, 29, w)
    ref = reference(x.double(), nw.double(), nb.double(), 29, w.double(), None, None, 1, False, None)
    _check("y", y, ref, 1e-5)


def test_backward_saves_only_x_params_and_statistics():
    """Nothing activation-sized beyond x itself is kept for backward (no activated, no
    upsampled tensor)."""
    x, p, residual, groups, stride, up = _inputs(CASES[2])  # the upsampling case
    x.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with backends.cpu_backend("composite"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.gn_silu_conv3d(x, p["nw"], p["nb"], groups, p["w"], p["b"], bias_in=p["bias_in"],
                           upsample=True)
    inputs = {t.data_ptr() for t in (x, p["nw"], p["nb"], p["bias_in"], p["w"], p["b"])}
    stats = [t for t in saved if t.data_ptr() not in inputs]
    assert len(stats) == 2 and all(t.shape == (x.shape[0], groups) for t in stats)


def test_fake_allocates_what_the_kernel_allocates():
    x, p, residual, groups, stride, up = _inputs(CASES[0])
    args = (x, p["nw"], p["nb"], p["bias_in"], groups, 1e-5, p["w"], p["b"], residual, stride, up)
    with backends.cpu_backend("triton-interpret"):
        real = fused_conv3d.gn_silu_conv3d_fwd(*args)
    fake = fused_conv3d._fwd_fake(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


@pytest.mark.parametrize("backend,case", [("composite", CASES[2]), ("triton-interpret", CASES[3])],
                         ids=["composite-up", "interpret-1x1x1"])
def test_opcheck(backend, case):
    x, p, residual, groups, stride, up = _inputs(case)
    args = (x.requires_grad_(True), p["nw"].requires_grad_(True), p["nb"].requires_grad_(True),
            p["bias_in"], groups, 1e-5, p["w"].requires_grad_(True), p["b"], residual, stride, up)
    with backends.cpu_backend(backend):
        torch.library.opcheck(fused_conv3d.gn_silu_conv3d_fwd, args)


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 29, 3, 3, 3)
    nw, nb, w = torch.ones(29), torch.zeros(29), torch.randn(8, 29, 3, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        ops.gn_silu_conv3d(x, nw, nb, 4, w)
    with pytest.raises(ValueError, match="conv_weight"):
        ops.gn_silu_conv3d(x, nw, nb, 29, torch.randn(8, 29, 5, 5, 5))
    with pytest.raises(ValueError, match="stride"):
        ops.gn_silu_conv3d(x, nw, nb, 29, w, stride=3)
    with pytest.raises(ValueError, match="upsample"):
        ops.gn_silu_conv3d(x, nw, nb, 29, w, stride=2, upsample=True)
    with pytest.raises(ValueError, match="residual"):
        ops.gn_silu_conv3d(x, nw, nb, 29, w, residual=torch.randn(1, 8, 2, 2, 2))


def test_public_face_reexports_the_ops():
    from patchddm_fast import kernels

    assert ops.gn_silu_conv3d is kernels.gn_silu_conv3d
    assert ops.group_norm_silu is kernels.group_norm_silu
    assert {"average_skip_", "residual_add_", "group_norm_silu", "gn_silu_conv3d"} <= set(ops.__all__)


def test_torch_compile_fullgraph_matches_eager():
    """The op is opaque to the compiler, which traces its fake implementation; values and
    every gradient equal eager (one compilation, tiny, the composite CPU kernel)."""
    x, p, residual, groups, stride, up = _inputs(CASES[0])
    args = [x, p["nw"], p["nb"], p["w"], p["b"], p["bias_in"], residual]
    args = [a.detach().requires_grad_(True) for a in args]

    def block(x, nw, nb, w, b, bias_in, residual):
        return ops.gn_silu_conv3d(x, nw, nb, groups, w, b, bias_in=bias_in, residual=residual) * 2

    with backends.cpu_backend("composite"):
        eager = block(*args)
        g = torch.randn_like(eager)
        eager_grads = torch.autograd.grad(eager, args, g)
        compiled = torch.compile(block, fullgraph=True)(*args)
        compiled_grads = torch.autograd.grad(compiled, args, g)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
