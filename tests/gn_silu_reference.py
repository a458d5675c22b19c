"""The float64 ground truth for the fused GroupNorm -> SiLU kernels (test code only).

Built from ``F.group_norm`` and ``F.silu`` in the dtype of its input and differentiated
by autograd: an implementation independent of the hand-written closed forms of the
Triton, C++ and composite kernels.  Called with float64 tensors it is what
tests/test_ops_gn_silu.py and tests/test_cpu_ext.py compare every output and gradient to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gn_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                      eps: float = 1e-5, bias_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``SiLU(GroupNorm(x + bias_in))`` in the dtype of ``x`` (use float64 for ground truth)."""
    if bias_in is not None:
        x = x + bias_in.reshape(*bias_in.shape, *([1] * (x.dim() - 2)))
    return F.silu(F.group_norm(x, groups, weight, bias, eps))
