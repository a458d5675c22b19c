"""The composite implementation of the fused ops: plain PyTorch, any device, any float dtype.

The CPU kernels fall back to it (no C++ compiler, float64, shapes the other
implementations do not take; :mod:`.backends`), and so do the CUDA kernels for float64.
:func:`gn_silu_forward` / :func:`gn_silu_backward` / :func:`average_skip_` /
:func:`residual_add_` have exactly the signatures of the Triton launchers and of the C++
kernels (:mod:`.cpu_ext`).  The backward is written out by hand (the same closed form
the Triton and C++ kernels use), computes in fp32 (fp64 for fp64 inputs), and like the
kernels keeps nothing but the per-group float32 (mean, rstd) for backward.  (The float64
ground truth the kernels are tested against, built from ``F.group_norm`` and ``F.silu``
and differentiated by autograd, is test code: tests/gn_silu_reference.py.)

Backward closed form (per sample n, group g of M = cpg*S elements; z = x + bias_in):
  xhat = (z - mean) * rstd,  u = xhat*w + b,  y = u*sigmoid(u)
  gu   = dy * sigmoid(u) * (1 + u*(1 - sigmoid(u)))            (dL/du)
  A[n,c] = sum_s gu,  B[n,c] = sum_s gu*xhat
  dweight = sum_n B,  dbias = sum_n A
  m1 = sum_{c in g} w_c A[n,c] / M,  m2 = sum_{c in g} w_c B[n,c] / M
  dx = rstd * (w*gu - m1 - xhat*m2),  dbias_in[n,c] = sum_s dx[n,c,:]
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._layout import empty_in_layout

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """(N, C) -> (N, C, 1, ..., 1) broadcastable against an ``ndim``-dimensional tensor."""
    return t.reshape(*t.shape, *([1] * (ndim - 2)))


def _pre_norm(x: Tensor, bias_in: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    z = x.to(dtype)
    if bias_in is not None:
        z = z + _per_channel(bias_in.to(dtype), x.dim())
    return z


def _expand_groups(t: Tensor, cpg: int) -> Tensor:
    """(N, G) group statistic -> (N, C)."""
    return t.repeat_interleave(cpg, dim=1)


def gn_statistics(x: Tensor, bias_in: Optional[Tensor], groups: int, eps: float
                  ) -> Tuple[Tensor, Tensor]:
    """Per-(sample, group) ``(mean, rstd)`` of ``x + bias_in`` in the compute dtype (fp32, fp64
    for fp64 inputs); two-pass variance, no E[z^2]-E[z]^2 cancellation."""
    n = x.shape[0]
    zg = _pre_norm(x, bias_in, _compute_dtype(x)).reshape(n, groups, -1)
    mean = zg.mean(dim=-1)
    var = (zg - mean[..., None]).square().mean(dim=-1)
    return mean, (var + eps).rsqrt()


def gn_silu_apply(x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor], mean: Tensor,
                  rstd: Tensor, groups: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``silu(GN(x + bias_in))`` from given per-(sample, group) ``mean``/``rstd``, x's shape and
    layout, in ``out_dtype`` (default: the compute dtype, fp32 or fp64 for fp64 inputs).

    The one home of "apply GroupNorm-SiLU from statistics": the composite op, the fused
    convolution's CPU path and the slab-wise inference executor (one depth slab at a time) all
    call it.  It computes in a single compute-dtype copy of ``x``, in place, so a slab costs one
    buffer (the executor's memory depends on that).
    """
    n, c = x.shape[:2]
    dt = _compute_dtype(x)
    spatial = (1,) * (x.dim() - 2)
    s = x.to(dt, copy=True)  # the one buffer; everything below is in place
    if bias_in is not None:
        s.add_(_per_channel(bias_in.to(dt), x.dim()))
    grouped = s.unflatten(1, (groups, c // groups))  # a view in any memory layout
    grouped.sub_(mean.to(dt).reshape(n, groups, 1, *spatial)).mul_(rstd.to(dt).reshape(n, groups, 1, *spatial))
    s.mul_(weight.to(dt).reshape(1, c, *spatial)).add_(bias.to(dt).reshape(1, c, *spatial))
    y = F.silu(s, inplace=True)
    return y if out_dtype is None else y.to(out_dtype)


def gn_silu_forward(x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor], groups: int,
                    eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Composite forward: ``(y, mean, rstd)``; y like x (dtype, layout), stats float32 (N, groups)."""
    mean, rstd = gn_statistics(x, bias_in, groups, eps)
    y = empty_in_layout(x)
    y.copy_(gn_silu_apply(x, weight, bias, bias_in, mean, rstd, groups))
    return y, mean.float(), rstd.float()


def gn_silu_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor],
                     mean: Tensor, rstd: Tensor, groups: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Composite backward: ``(dx, dweight, dbias, dbias_in or None)`` from saved x and stats."""
    n, c = x.shape[:2]
    nd = x.dim()
    cpg = c // groups
    m_elems = cpg * (x.numel() // max(1, n * c))
    dt = _compute_dtype(x)
    spatial = tuple(range(2, nd))
    rs = _per_channel(_expand_groups(rstd.to(dt), cpg), nd)
    xhat = (_pre_norm(x, bias_in, dt) - _per_channel(_expand_groups(mean.to(dt), cpg), nd)) * rs
    w = _per_channel(weight.to(dt).expand(n, c), nd)
    u = xhat * w + _per_channel(bias.to(dt).expand(n, c), nd)
    sig = torch.sigmoid(u)
    gu = dy.to(dt) * sig * (1 + u * (1 - sig))
    a = gu.sum(dim=spatial)
    b = (gu * xhat).sum(dim=spatial)
    m1 = (weight.to(dt) * a).reshape(n, groups, cpg).sum(-1) / m_elems
    m2 = (weight.to(dt) * b).reshape(n, groups, cpg).sum(-1) / m_elems
    dx_c = rs * (w * gu - _per_channel(_expand_groups(m1, cpg), nd)
                 - xhat * _per_channel(_expand_groups(m2, cpg), nd))
    dx = empty_in_layout(x)
    dx.copy_(dx_c)
    dbias_in = None
    if bias_in is not None:
        dbias_in = dx_c.sum(dim=spatial).to(bias_in.dtype)
    return dx, b.sum(0).to(weight.dtype), a.sum(0).to(bias.dtype), dbias_in


def average_skip_(h: Tensor, skip: Tensor) -> Tensor:
    """h <- (h + skip) / 2 in place (h/2 + skip/2: same rounding, never overflows)."""
    return h.mul_(0.5).add_(skip, alpha=0.5)


def residual_add_(h: Tensor, skip: Tensor) -> Tensor:
    """h <- h + skip in place."""
    return h.add_(skip)
