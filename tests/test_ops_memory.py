"""Saved-tensor bytes of one residual block in training: reference ops vs the fused ops.

The block is the paper's ``GN-SiLU-conv-(+emb)-GN-SiLU-conv``, built through the
network's backend switch (:mod:`patchddm_fast.model.backend`).  Everything autograd keeps
for backward is counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique
storages, parameters excluded), on CPU with the composite backend.

Per GroupNorm->SiLU the reference keeps the fp32 normalised tensor (saved by SiLU) and,
for fp16 activations, the fp32 copy of the input (saved by GroupNorm, which runs in
fp32); the fused op keeps neither -- only its input, the (N, C) bias and two (N, groups)
fp32 statistics.  The activated tensor is the convolution's input, which both keep.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from patchddm_fast import kernels as ops
from patchddm_fast.model import backend

N, C, GROUPS, SPATIAL = 1, 6, 2, (4, 5, 6)


def _counting_hooks(params):
    """(storages, hooks): the hooks record every saved tensor's storage bytes, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    return storages, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _saved_bytes(ops_name: str, dtype: torch.dtype) -> tuple[int, int]:
    """(saved bytes excluding parameters, elements of one activation) for one block."""
    torch.manual_seed(0)
    params = dict(
        gn1_w=torch.randn(C), gn1_b=torch.randn(C), gn2_w=torch.randn(C), gn2_b=torch.randn(C),
        conv1=torch.randn(C, C, 3, 3, 3, dtype=dtype) * 0.1,
        conv2=torch.randn(C, C, 3, 3, 3, dtype=dtype) * 0.1,
    )
    for p in params.values():
        p.requires_grad_(True)
    x = torch.randn(N, C, *SPATIAL, dtype=dtype, requires_grad=True)
    emb = torch.randn(N, C, dtype=dtype, requires_grad=True)  # Linear(SiLU(t_emb)) output
    storages, hooks = _counting_hooks(params.values())
    with ops.cpu_backend("composite"), hooks:
        h = backend.group_norm_silu(ops_name, x, params["gn1_w"], params["gn1_b"], GROUPS)
        h = F.conv3d(h, params["conv1"], padding=1)
        h = backend.group_norm_silu(ops_name, h, params["gn2_w"], params["gn2_b"], GROUPS, bias_in=emb)
        h = F.conv3d(h, params["conv2"], padding=1)
    h.float().sum().backward()  # the graph is complete and runs
    return sum(storages.values()), x.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_block_drops_normalised_tensors(dtype):
    ref_bytes, numel = _saved_bytes("reference", dtype)
    fused_bytes, _ = _saved_bytes("fused", dtype)
    act = numel * torch.finfo(dtype).bits // 8  # one activation in the block's dtype
    f32 = numel * 4                               # one activation in fp32
    stats = 4 * N * GROUPS * 4                    # (mean, rstd) of both GroupNorms
    emb = N * C * torch.finfo(dtype).bits // 8
    # fused: x, conv1 input, conv1 output (= GN2 input), conv2 input, emb, statistics
    assert fused_bytes == 4 * act + emb + stats
    # saved by the reference's two SiLUs: GroupNorm's output cast back to the block's dtype
    # (the reference code's order: GroupNorm32, then nn.SiLU in the activation dtype)
    normalised = 2 * act
    if dtype == torch.float32:
        # reference: x, normalised, conv1 input, h + emb, normalised, conv2 input, statistics
        assert ref_bytes == 4 * act + normalised + stats
        assert ref_bytes - fused_bytes == normalised - emb
    else:
        # reference: fp32 copies of both GroupNorm inputs, 2 normalised, 2 conv inputs, stats
        assert ref_bytes == 2 * f32 + normalised + 2 * act + stats
        assert ref_bytes - fused_bytes == 2 * f32 + normalised - 2 * act - emb
    # at least the normalised tensors, up to the (N, C) bias the fused op keeps instead
    assert ref_bytes - fused_bytes >= normalised - emb


def _block_saved_bytes(ops_name: str, recompute: str) -> int:
    """Saved bytes (unique storages, parameters excluded) of one real network ResBlock in training."""
    from patchddm_fast.model.unet import UNet3D
    from patchddm_fast.model.execution.policy import ExecutionPolicy

    torch.manual_seed(0)
    net = UNet3D(in_channels=5, base_width=C, channel_mult=(1, 1), groups=GROUPS,
                 policy=ExecutionPolicy(ops=ops_name, recompute=recompute))
    block = net.encoder[0].blocks[0]
    x = torch.randn(N, C, *SPATIAL, requires_grad=True)
    emb_act = torch.randn(N, block.emb_proj.in_features, requires_grad=True)
    storages, hooks = _counting_hooks(net.parameters())
    with ops.cpu_backend("composite"), hooks:
        out = block(x, emb_act)
    out.sum().backward()
    return sum(storages.values())


def test_selective_block_drops_the_normalised_and_the_activated_tensors():
    """The engine's residual block (fused ops, selective recompute: GroupNorm-SiLU is
    recomputed in backward, the convolution is not) saves neither the normalised nor the
    activated tensor of either GroupNorm-SiLU: at least 4 activations fewer than the paper's
    block, fp32."""
    act = N * C * math.prod(SPATIAL) * 4
    ref = _block_saved_bytes("reference", "none")
    engine = _block_saved_bytes("fused", "selective")
    assert ref - engine >= 4 * act, (ref, engine, act)
    # what the engine keeps: the block input and the first convolution's output, plus small vectors
    assert engine <= 2 * act + 4 * N * C * 4 + N * 64 * 4, (engine, act)
