"""The two primitive ops the network is built from, behind one switch.

The paper's residual block spends most of its training memory on tensors that only
exist between GroupNorm, SiLU and the convolution, and on the skip average.  The
network therefore never calls ``F.group_norm``/``F.silu`` or ``(h + s) / 2`` directly:
it asks this module, which routes to

* ``"reference"`` -- plain PyTorch in the paper's code's order: GroupNorm in fp32, cast
  back to the input dtype (guided-diffusion's ``GroupNorm32``), then ``nn.SiLU`` in that
  dtype -- so the memory simulator and the profiler model the paper recipe as it ran;
* ``"fused"`` -- the custom ops of :mod:`patchddm_fast.kernels` (Triton on CUDA, C++/composite
  on CPU), which save only the input and per-group statistics for backward and average
  skips in place.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from patchddm_fast import kernels as fused_ops
from patchddm_fast.kernels import conv3d_cpu as cpu_conv

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
    """SiLU(GroupNorm(x + bias_in)) in the reference code's order: ``GroupNorm32`` (GroupNorm
    of ``x.float()``, cast back to ``x.dtype``), then SiLU in ``x.dtype``.

    ``bias_in`` is an optional (N, C) per-sample, per-channel bias added before the
    normalisation (the residual block's time-embedding projection).  In fp32 the cast is a
    no-op; in fp16/bf16 SiLU rounds in the low precision, as the paper's code did.
    """
    if bias_in is not None:
        x = x + bias_in.reshape(*bias_in.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return F.silu(F.group_norm(x.float(), groups, weight.float(), bias.float(), eps).to(x.dtype))


def reference_average_skip(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The paper's averaging skip connection, out of place: (h + skip) / 2."""
    return (h + skip) / 2


def group_norm_silu(ops: str, x, weight, bias, groups, eps=1e-5, bias_in=None) -> torch.Tensor:
    if ops == "fused":
        return fused_ops.group_norm_silu(x, weight, bias, groups, eps=eps, bias_in=bias_in)
    return reference_group_norm_silu(x, weight, bias, groups, eps, bias_in)


def average_skip(ops: str, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    if ops == "fused":
        return fused_ops.average_skip_(h, skip)
    return reference_average_skip(h, skip)


def residual_add(ops: str, h: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """A residual block's ``shortcut + h``; the engine writes it into ``h`` in place.

    Safe because ``h`` is always a convolution's fresh output, which no backward saves;
    mixed dtypes (possible under autocast) take the out-of-place sum.
    """
    if ops == "fused" and h.dtype == shortcut.dtype and h.shape == shortcut.shape:
        return fused_ops.residual_add_(h, shortcut)
    return shortcut + h


def conv3d(ops: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding) -> torch.Tensor:
    """Conv3d (groups=1, dilation=1): the engine runs oneDNN in both directions on CPU
    (:mod:`patchddm_fast.kernels.conv3d_cpu`), else ``F.conv3d``."""
    if ops == "fused" and cpu_conv.onednn_usable(x, weight):
        return cpu_conv.conv3d(x, weight, bias, stride, padding)
    return F.conv3d(x, weight, bias, stride, padding)


def conv3d_backward(ops: str, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride,
                    padding, need_x: bool, need_w: bool, need_b: bool):
    """(grad_x, grad_weight, grad_bias) of :func:`conv3d`, by the same backend its forward uses:
    for callers that run a convolution's backward themselves (selective recompute)."""
    if ops == "fused" and cpu_conv.onednn_usable(x, weight):
        return cpu_conv.conv3d_backward(grad, x, weight, stride, padding, need_x, need_w, need_b and has_bias)
    return cpu_conv.pytorch_conv3d_backward(grad, x, weight, stride, padding, need_x, need_w, need_b and has_bias)


class Conv3d(torch.nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) whose forward goes through :func:`conv3d`."""

    ops: str = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.groups != 1 or self.dilation != (1, 1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv3d(self.ops, x, self.weight, self.bias, self.stride, self.padding)
