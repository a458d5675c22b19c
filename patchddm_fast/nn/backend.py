"""The two primitive ops the network is built from, behind one switch.

The paper's residual block spends most of its training memory on tensors that only
exist between GroupNorm, SiLU and the convolution, and on the skip average.  The
network therefore never calls ``F.group_norm``/``F.silu`` or ``(h + s) / 2`` directly:
it asks this module, which routes to

* ``"reference"`` -- plain PyTorch, numerically the paper's code (GroupNorm in fp32,
  then cast back to the input dtype, exactly like guided-diffusion's ``GroupNorm32``);
* ``"fused"`` -- the custom ops of :mod:`patchddm_fast.ops` (Triton on CUDA, C++/composite
  on CPU), which save only the input and per-group statistics for backward and average
  skips in place.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OPS_BACKENDS = ("reference", "fused")


def check_backend(ops: str) -> str:
    if ops not in OPS_BACKENDS:
        raise ValueError(f"ops must be one of {OPS_BACKENDS}, got {ops!r}")
    return ops


def reference_group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float = 1e-5,
    bias_in: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SiLU(GroupNorm(x + bias_in)) computed in fp32 and cast back to ``x.dtype``.

    ``bias_in`` is an optional (N, C) per-sample, per-channel bias added before the
    normalisation (the residual block's time-embedding projection).
    """
    if bias_in is not None:
        x = x + bias_in.reshape(*bias_in.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    return F.silu(y).to(x.dtype)


def reference_average_skip(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The paper's averaging skip connection, out of place: (h + skip) / 2."""
    return (h + skip) / 2


def group_norm_silu(ops: str, x, weight, bias, groups, eps=1e-5, bias_in=None) -> torch.Tensor:
    if ops == "fused":
        from patchddm_fast import ops as fused_ops

        return fused_ops.group_norm_silu(x, weight, bias, groups, eps=eps, bias_in=bias_in)
    return reference_group_norm_silu(x, weight, bias, groups, eps, bias_in)


def average_skip(ops: str, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    if ops == "fused":
        from patchddm_fast import ops as fused_ops

        return fused_ops.average_skip_(h, skip)
    return reference_average_skip(h, skip)


class _OneDnnConv3d(torch.autograd.Function):
    """3D convolution whose *forward* runs oneDNN directly; backward is PyTorch's own.

    On the CPU builds we ship against, ``F.conv3d`` picks the im2col ``slow_conv3d`` path
    for fp32 volumes, which is 3-25x slower in the forward than the oneDNN kernel the same
    build contains (see BENCHMARKS.md).  oneDNN's backward is not faster on these shapes,
    so the backward stays ``aten.convolution_backward``, the function PyTorch itself uses;
    saved tensors are the same as ``F.conv3d``'s (input and weight).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, bias is not None)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, [1, 1, 1], 1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, [1, 1, 1], False,
            [0, 0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
        )
        return dx, dw, db, None, None


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def conv3d(ops: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding) -> torch.Tensor:
    """Conv3d (groups=1, dilation=1): the engine uses oneDNN's forward on CPU, else ``F.conv3d``."""
    if ops == "fused" and _onednn_usable(x, weight):
        return _OneDnnConv3d.apply(x, weight, bias, list(stride), list(padding))
    return F.conv3d(x, weight, bias, stride, padding)


class Conv3d(torch.nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) whose forward goes through :func:`conv3d`."""

    ops: str = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.groups != 1 or self.dilation != (1, 1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv3d(self.ops, x, self.weight, self.bias, self.stride, self.padding)
