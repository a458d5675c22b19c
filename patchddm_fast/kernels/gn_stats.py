"""GroupNorm statistics gathered slab by slab.

The fused op (:mod:`.gn_silu`) normalises a whole tensor in one call.  The low-memory
inference executor (:mod:`patchddm_fast.model.execution.tiled`) cannot: it never holds the
activated tensor whole, so it needs the per-(sample, group) statistics first and then applies
``SiLU(GN(x))`` one depth slab at a time with :func:`.composite.gn_silu_apply` (the one home
of "apply from statistics").

:func:`group_stats` -- mean and ``1/sqrt(var + eps)`` in fp32, combining per-slab mean and M2
with Chan et al.'s parallel formula (stable; no ``E[x^2] - E[x]^2``).  Numerically this equals
``F.group_norm``'s statistics up to summation order.  A no-grad path, by design.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

GroupStats = Tuple[torch.Tensor, torch.Tensor]


def group_stats(x: torch.Tensor, groups: int, bias_in: Optional[torch.Tensor], eps: float,
                rows: int) -> GroupStats:
    """Per-(sample, group) mean and 1/sqrt(var + eps) of ``x + bias_in`` in fp32, ``rows``
    depth rows at a time (``x`` is (N, C, D, H, W); ``bias_in`` an optional (N, C) bias)."""
    n, c, depth = x.shape[:3]
    count = 0
    mean = m2 = None
    for d0 in range(0, depth, rows):
        s = x[:, :, d0:min(depth, d0 + rows)].float()
        if bias_in is not None:
            s = s + bias_in.float().reshape(n, c, 1, 1, 1)
        s = s.reshape(n, groups, -1)
        k = s.shape[-1]
        var_s, mean_s = torch.var_mean(s, dim=-1, correction=0)
        m2_s = var_s * k
        if mean is None:
            mean, m2, count = mean_s, m2_s, k
        else:
            tot = count + k
            delta = mean_s - mean
            mean = mean + delta * (k / tot)
            m2 = m2 + m2_s + delta * delta * (count * k / tot)
            count = tot
    var = m2 / count
    return mean, torch.rsqrt(var + eps)
