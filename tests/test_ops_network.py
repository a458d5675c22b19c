"""The whole U-Net with ``ops="fused"`` equals ``ops="reference"`` in fp32: output and all
parameter gradients, through the real Triton kernels (interpreter) and the composite.

Tiny 3-level network (conftest ``tiny_unet_kwargs``: widths 8/16/16, 4 groups -> 2 and 4
channels per group) on a 2 x 5 x 8^3 input.  The conv2 of every residual block and the
output head are zero-initialised, which would hide most of the network from the
comparison, so all parameters are re-drawn at random first.  Tolerance: relative L2
error 1e-4 for the output and for every parameter's gradient (fp32 through ~20 layers;
observed <= 6e-7 for the output and <= 7e-6 for the worst gradient).
"""
from __future__ import annotations

import copy

import pytest
import torch

from patchddm_fast import kernels as ops
from patchddm_fast.kernels import cpu_ext
from patchddm_fast.model import ExecutionPolicy


def _cpp_available() -> bool:
    return cpu_ext.available()


@pytest.mark.parametrize("backend", ["triton-interpret", "composite", pytest.param(
    "cpp", marks=pytest.mark.skipif(not _cpp_available(), reason="the C++ extension did not build here"))])
def test_fused_network_matches_reference(tiny_unet_factory, backend):
    ref_net = tiny_unet_factory()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref_net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    fused_net = copy.deepcopy(ref_net).apply_policy(ExecutionPolicy(ops="fused"))
    x = torch.randn(2, 5, 8, 8, 8, generator=g)
    t = torch.tensor([3, 700])
    outputs, grads = [], []
    for net in (ref_net, fused_net):
        with ops.cpu_backend(backend):
            out = net(x, t)
            out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    rel = ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()
    assert rel < 1e-4, rel
    for name, ref_grad in grads[0].items():
        err = ((grads[1][name] - ref_grad).norm() / ref_grad.norm()).item()
        assert err <= 1e-4, (name, err)
