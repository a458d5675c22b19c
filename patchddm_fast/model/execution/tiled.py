"""Low-memory inference: the U-Net's forward in depth slabs, reusing buffers in place.

A plain no-grad residual block at 256^3 holds three full-resolution tensors at once: its
input (needed for the shortcut), the GroupNorm-SiLU output and the convolution output.
This executor runs the *same modules with the same parameters* so that only two are ever
alive, plus slabs:

1. GroupNorm statistics are computed slab by slab in fp32 (Chan's parallel combination of
   per-slab mean and M2: stable, no E[x^2]-E[x]^2);
2. ``conv(SiLU(GN(x)))`` is computed one depth slab of the output at a time from the input
   rows it needs (one halo row each side), so the activated tensor exists only per slab;
3. the second convolution of a block writes its output *into its own input buffer*: slab k
   of the output overwrites input rows that no later slab needs (the one row the next slab
   still needs is kept aside), and the residual is added in place;
4. skips held in host memory (:class:`~.offload.OffloadedSkips`) are averaged into the
   decoder state slab by slab, so a skip never returns to the device whole.

Numerically it is the network's forward up to floating-point summation order (statistics
are combined per slab, convolutions see slab-shaped inputs): fp32 results agree to ~1e-6.
It is an inference path only (grad disabled).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from patchddm_fast.model.execution.offload import OffloadedSkips
from patchddm_fast.model.execution.recompute import conv_as_module

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


def group_stats(x: torch.Tensor, groups: int, bias_in: Optional[torch.Tensor], eps: float,
                rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and 1/sqrt(var + eps) of ``x + bias_in`` in fp32, slab by slab."""
    n, c, depth = x.shape[:3]
    count = 0
    mean = m2 = None
    for d0, d1 in _slabs(depth, rows):
        s = x[:, :, d0:d1].float()
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


def _norm_act(xs: torch.Tensor, norm, stats, bias_in: Optional[torch.Tensor], out_dtype) -> torch.Tensor:
    """SiLU(GN(x + bias_in)) for one slab with precomputed group statistics (fp32 math)."""
    mean, rstd = stats
    n, c = xs.shape[:2]
    g = norm.num_groups
    s = xs.to(torch.float32, copy=True)  # the one fp32 slab buffer; everything below is in place
    if bias_in is not None:
        s.add_(bias_in.float().reshape(n, c, 1, 1, 1))
    grouped = s.view((n, g, c // g) + tuple(xs.shape[2:]))
    grouped.sub_(mean.reshape(n, g, 1, 1, 1, 1)).mul_(rstd.reshape(n, g, 1, 1, 1, 1))
    s.mul_(norm.weight.float().reshape(1, c, 1, 1, 1)).add_(norm.bias.float().reshape(1, c, 1, 1, 1))
    return F.silu(s, inplace=True).to(out_dtype)


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
    stats = group_stats(x, norm.num_groups, bias_in, norm.eps, rows)
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
        a = _norm_act(window, norm, stats, bias_in, x.dtype)
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
    from patchddm_fast.model import backend

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

    ``skips`` is a skip store (``SkipStack`` or :class:`~.offload.OffloadedSkips`);
    ``slab_rows`` defaults to 1/32 of the input depth.
    """
    from patchddm_fast.model.unet import SkipStack

    if model.config["skip"] != "average":
        raise ValueError("the tiled executor supports averaging skips only (the paper's network)")
    skips = skips if skips is not None else SkipStack()
    rows = slab_rows or max(1, x.shape[2] // 32)
    emb_act = model.time_embedding(t)

    def rows_at(h: torch.Tensor, scale: int = 1) -> int:
        """Slab rows for a tensor like ``h`` with ``scale`` x its edge (the upsampling's output)."""
        depth = h.shape[2] * scale
        if h.numel() * h.element_size() * scale ** 3 <= SMALL_BYTES:  # small: one slab, fewer launches
            return depth
        return max(1, rows * depth // x.shape[2])

    dtype = _compute_dtype(x)
    h = x.new_empty((x.shape[0], model.conv_in.out_channels) + tuple(x.shape[2:]), dtype=dtype)
    for d0, d1 in _slabs(x.shape[2], rows):
        lo, hi = max(0, d0 - 1), min(x.shape[2], d1 + 1)
        h[:, :, d0:d1].copy_(_conv_window(model.conv_in, x[:, :, lo:hi], int(d0 == 0), int(d1 == x.shape[2]), dtype))
    skips.push(h)
    for level in model.encoder:
        for block in level.blocks:
            h = res_block(block, h, emb_act, rows_at(h))
            skips.push(h)
        if level.down is not None:
            h = level.down(h)
            skips.push(h)
    for block in model.middle:
        h = res_block(block, h, emb_act, rows_at(h))
    for level in model.decoder:
        for block in level.blocks:
            _average_into(h, skips, model.ops, rows_at(h))
            h = res_block(block, h, emb_act, rows_at(h))
        if level.up is not None:
            h = upsample_conv(h, level.up.conv, rows_at(h, scale=2))
    return norm_act_conv(h, model.out_norm, model.conv_out, rows_at(h))
