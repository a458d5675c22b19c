"""The custom ops under torch.compile (inductor, CPU, fullgraph): same values and gradients as eager.

One tiny residual-block-like function uses all three ops, so one compilation covers
them; it runs through the Triton interpreter backend (the op bodies are opaque to the
compiler, which traces their fake implementations).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from patchddm_fast import kernels as ops


def _block(x, w, b, emb, skip, conv_w):
    h = ops.group_norm_silu(x, w, b, 2, 1e-5)
    h = F.conv3d(h, conv_w, padding=1)
    h = ops.group_norm_silu(h, w, b, 2, 1e-5, bias_in=emb)
    h = F.conv3d(h, conv_w, padding=1)
    h = ops.residual_add_(h, x)
    return ops.average_skip_(h, skip)


def test_torch_compile_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    args = (torch.randn(1, 4, 3, 4, 5), torch.randn(4), torch.randn(4), torch.randn(1, 4),
            torch.randn(1, 4, 3, 4, 5), torch.randn(4, 4, 3, 3, 3) * 0.2)
    args = tuple(a.requires_grad_(True) for a in args)
    with ops.cpu_backend("triton-interpret"):
        eager = _block(*args)
        g = torch.randn_like(eager)
        eager_grads = torch.autograd.grad(eager, args, g)
        compiled_fn = torch.compile(_block, fullgraph=True)
        compiled = compiled_fn(*args)
        compiled_grads = torch.autograd.grad(compiled, args, g)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
