"""GroupNorm-SiLU split in two: statistics gathered slab by slab, then applied per slab.

The fused op (:mod:`.gn_silu`) normalises a whole tensor in one call.  The low-memory
inference executor (:mod:`patchddm_fast.model.execution.tiled`) cannot: it never holds the
activated tensor whole, so it needs the per-(sample, group) statistics first and then
``SiLU(GN(x))`` for one depth slab at a time.  This module is that pair, as plain tensor
math (no ``nn.Module``: weight, bias and the group count are passed in).

* :func:`group_stats` -- mean and ``1/sqrt(var + eps)`` in fp32, combining per-slab mean
  and M2 with Chan et al.'s parallel formula (stable; no ``E[x^2] - E[x]^2``).
* :func:`norm_act` -- ``SiLU(GN(x + bias_in))`` of one slab from those statistics, computed
  in one fp32 buffer in place.

Numerically this equals ``F.group_norm`` + ``F.silu`` up to summation order (fp32 results
agree to ~1e-6).  It is a no-grad path: nothing here is differentiable by design.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

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


def norm_act(xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, stats: GroupStats,
             bias_in: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """SiLU(GN(xs + bias_in)) for one slab ``xs`` with precomputed :func:`group_stats` (fp32
    math, result in ``out_dtype``)."""
    mean, rstd = stats
    n, c = xs.shape[:2]
    s = xs.to(torch.float32, copy=True)  # the one fp32 slab buffer; everything below is in place
    if bias_in is not None:
        s.add_(bias_in.float().reshape(n, c, 1, 1, 1))
    grouped = s.view((n, groups, c // groups) + tuple(xs.shape[2:]))
    grouped.sub_(mean.reshape(n, groups, 1, 1, 1, 1)).mul_(rstd.reshape(n, groups, 1, 1, 1, 1))
    s.mul_(weight.float().reshape(1, c, 1, 1, 1)).add_(bias.float().reshape(1, c, 1, 1, 1))
    return F.silu(s, inplace=True).to(out_dtype)
