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
