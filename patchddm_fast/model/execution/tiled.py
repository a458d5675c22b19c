"""Low-memory inference: the U-Net's forward in depth slabs, reusing buffers in place.

A plain no-grad residual block at 256^3 holds three full-resolution tensors at once: its
input (needed for the shortcut), the GroupNorm-SiLU output and the convolution output.
This executor runs the *same modules with the same parameters* so that only two are ever
alive, plus slabs:

1. GroupNorm statistics are computed slab by slab in fp32 (Chan's parallel combination of
   per-slab mean and M2: stable, no E[x^2]-E[x]^2; :mod:`patchddm_fast.kernels.gn_stats`);
2. ``conv(SiLU(GN(x)))`` is computed one depth slab of the output at a time from the input
   rows it needs (one halo row each side), so the activated tensor exists only per slab;
3. the second convolution of a block writes its output *into its own input buffer*: slab k
   of the output overwrites input rows that no later slab needs (the one row the next slab
   still needs is kept aside), and the residual is added in place;
4. skips held in host memory (:class:`~.skips.OffloadedSkips`) are averaged into the
   decoder state slab by slab, so a skip never returns to the device whole.

It walks the network's own structure, ``UNet3D.stages`` (the list the plain forward
iterates), running each stage's slab-wise twin; a stage kind it does not know is an error,
so a new kind of stage cannot be skipped silently.  What stays here is how one residual
block, upsampling and the output head run *slab-wise*: a change to how a residual block
computes must be mirrored in :func:`res_block` (tests/test_checkpointing.py compares the
two paths).

Numerically it is the network's forward up to floating-point summation order (statistics
are combined per slab, convolutions see slab-shaped inputs): fp32 results agree to ~1e-6.
It is an inference path only (grad disabled).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from patchddm_fast.kernels.composite import gn_silu_apply
from patchddm_fast.kernels.gn_stats import group_stats
from patchddm_fast.model import backend
from patchddm_fast.model.execution.recompute import conv_as_module
from patchddm_fast.model.execution.skips import OffloadedSkips, SkipStack

# Tensors up to this size are processed as one slab (slabs only pay off for big volumes).
SMALL_BYTES = 32 << 20


def _slabs(depth: int, rows: int):
    for d0 in range(0, depth, rows):
        yield d0, min(depth, d0 + rows)


def _compute_dtype(like: torch.Tensor) -> torch.dtype:
    device_type = like.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return like.dtype


def _conv_window(conv, a: torch.Tensor, pad_lo: int, pad_hi: int, dtype: torch.dtype) -> torch.Tensor:
    """A 3x3x3 / 1x1x1 conv over a depth window: zero rows at the volume borders, 'valid' in depth."""
    k = conv.kernel_size[0]
    if k == 3 and (pad_lo or pad_hi):
        a = F.pad(a, (0, 0, 0, 0, pad_lo, pad_hi))
    pad = (0,) + tuple(conv.padding[1:]) if k == 3 else conv.padding
    return conv_as_module(conv, a, dtype, padding=pad)


def norm_act_conv(x: torch.Tensor, norm, conv, rows: int, bias_in: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
    """``conv(SiLU(GN(x + bias_in)))`` slab by slab; ``inplace`` writes the result into ``x``."""
    depth = x.shape[2]
    dtype = _compute_dtype(x)
    groups = norm.num_groups
    stats = group_stats(x, groups, bias_in, norm.eps, rows)
    if inplace:
        if conv.out_channels != x.shape[1]:
            raise ValueError("in-place slab convolution needs equal input and output channels")
        out = x
    elif out is None:
        out = x.new_empty((x.shape[0], conv.out_channels) + tuple(x.shape[2:]), dtype=dtype)
    halo = None  # the original last row of the previous input slab (overwritten in place)
    for d0, d1 in _slabs(depth, rows):
        lo, hi = max(0, d0 - 1), min(depth, d1 + 1)
        window = x[:, :, d0:hi]
        if d0 > 0:
            window = torch.cat([halo if inplace else x[:, :, lo:d0], window], dim=2)
        if inplace:
            halo = x[:, :, d1 - 1:d1].clone()
        a = gn_silu_apply(window, norm.weight, norm.bias, bias_in, *stats, groups, out_dtype=x.dtype)
        y = _conv_window(conv, a, int(d0 == 0), int(d1 == depth), dtype)
        del a, window
        out[:, :, d0:d1].copy_(y)
        del y
    return out


def upsample_conv(x: torch.Tensor, conv, rows: int) -> torch.Tensor:
    """``conv(nearest_upsample_x2(x))`` slab by slab: the upsampled tensor never exists whole."""
    n, c, d = x.shape[:3]
    depth = 2 * d
    dtype = _compute_dtype(x)
    out = x.new_empty((n, conv.out_channels, depth, 2 * x.shape[3], 2 * x.shape[4]), dtype=dtype)
    for d0, d1 in _slabs(depth, rows):
        lo, hi = max(0, d0 - 1), min(depth, d1 + 1)
        idx = torch.arange(lo, hi, device=x.device) // 2
        window = F.interpolate(x.index_select(2, idx), scale_factor=(1, 2, 2), mode="nearest")
        y = _conv_window(conv, window, int(d0 == 0), int(d1 == depth), dtype)
        del window
        out[:, :, d0:d1].copy_(y)
        del y
    return out


def res_block(block, x: torch.Tensor, emb_act: torch.Tensor, rows: int) -> torch.Tensor:
    """A residual block holding only its input and one output buffer (plus slabs)."""
    h = norm_act_conv(x, block.norm1, block.conv1, rows)
    bias = block.emb_proj(emb_act).to(h.dtype)
    h = norm_act_conv(h, block.norm2, block.conv2, rows, bias_in=bias, inplace=True)
    if isinstance(block.shortcut, torch.nn.Identity):
        h += x
    else:
        dtype = h.dtype
        for d0, d1 in _slabs(x.shape[2], rows):
            h[:, :, d0:d1] += _conv_window(block.shortcut, x[:, :, d0:d1], 0, 0, dtype)
    return h


def _average_into(h: torch.Tensor, skips: Any, ops: str, rows: int) -> None:
    """h <- (h + skip) / 2 for the decoder's next skip, streaming it from host if offloaded."""
    if isinstance(skips, OffloadedSkips):
        host = skips.pop_host().detach()
        for d0, d1 in _slabs(h.shape[2], rows):
            sl = (slice(None), slice(None), slice(d0, d1))
            s = skips.store.host_slab(host, sl, h.device)
            h[sl].add_(s).mul_(0.5)
            del s
        return
    skip = skips.pop()
    if ops == "fused":
        backend.average_skip(ops, h, skip)
    else:
        h.add_(skip).mul_(0.5)


@torch.no_grad()
def tiled_forward(model, x: torch.Tensor, t: torch.Tensor, skips: Any = None, slab_rows: Optional[int] = None) -> torch.Tensor:
    """The network's no-grad forward with slab-wise convolutions and in-place buffer reuse.

    ``model`` is a ``UNet3D`` (walked through its ``stages``); ``skips`` is a skip store
    (:class:`~.skips.SkipStack` or :class:`~.skips.OffloadedSkips`); ``slab_rows`` defaults
    to 1/32 of the input depth.
    """
    if model.config["skip"] != "average":
        raise ValueError("the tiled executor supports averaging skips only (the paper's network)")
    skips = skips if skips is not None else SkipStack()
    rows = slab_rows or max(1, x.shape[2] // 32)
    emb_act = model.time_embedding(t)
    ops = model.policy.ops

    def rows_at(h: torch.Tensor, scale: int = 1) -> int:
        """Slab rows for a tensor like ``h`` with ``scale`` x its edge (the upsampling's output)."""
        depth = h.shape[2] * scale
        if h.numel() * h.element_size() * scale ** 3 <= SMALL_BYTES:  # small: one slab, fewer launches
            return depth
        return max(1, rows * depth // x.shape[2])

    dtype = _compute_dtype(x)
    # One loop, every tensor reference local to it (as in UNet3D._forward): a block's input
    # dies as soon as the block has consumed it.
    for kind, modules in model.stages:
        if kind == "input":
            conv_in = modules[0]
            h = x.new_empty((x.shape[0], conv_in.out_channels) + tuple(x.shape[2:]), dtype=dtype)
            for d0, d1 in _slabs(x.shape[2], rows):
                lo, hi = max(0, d0 - 1), min(x.shape[2], d1 + 1)
                h[:, :, d0:d1].copy_(_conv_window(conv_in, x[:, :, lo:hi], int(d0 == 0), int(d1 == x.shape[2]), dtype))
            skips.push(h)
        elif kind == "encoder":
            level = modules[0]
            for block in level.blocks:
                h = res_block(block, h, emb_act, rows_at(h))
                skips.push(h)
            if level.down is not None:
                h = level.down(h)
                skips.push(h)
        elif kind == "middle":
            h = res_block(modules[0], h, emb_act, rows_at(h))
        elif kind == "decoder":
            level = modules[0]
            for block in level.blocks:
                _average_into(h, skips, ops, rows_at(h))
                h = res_block(block, h, emb_act, rows_at(h))
            if level.up is not None:
                h = upsample_conv(h, level.up.conv, rows_at(h, scale=2))
        elif kind == "output":
            norm, conv = modules
            h = norm_act_conv(h, norm, conv, rows_at(h))
        else:
            raise ValueError(f"the tiled executor has no slab-wise twin of stage kind {kind!r}")
    return h
