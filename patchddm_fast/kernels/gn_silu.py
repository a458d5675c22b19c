"""Fused GroupNorm -> SiLU (with an optional pre-norm per-channel bias) in Triton.

Why: in the paper's residual block ``GroupNorm -> SiLU -> Conv`` the reference ops keep,
per GroupNorm, the fp32 normalised tensor (saved by SiLU) and -- for fp16/bf16
activations -- an fp32 copy of the input (saved by the fp32 GroupNorm).  The fused op
keeps only its input and per-group (mean, rstd), and recomputes the normalised and
activated values in backward (the activated tensor is still saved by the following
convolution as its input).  Measured in tests/test_ops_memory.py: per GroupNorm one
activation less in fp32 training, three fp16-activation-sizes less in fp16.  The
residual block's time-embedding bias is added right before its second GroupNorm;
``bias_in`` (N, C) fuses that add too (it is part of the statistics).

Layout of the work.  A tensor is viewed as (N, C, S) (layouts "cf"/"cl", see
:mod:`._layout`); each program owns one sample n, a tile of G_TILE groups and one
contiguous *chunk* of S, and loops over the chunk with a register tile
[G_TILE, CPG_PAD, BLOCK_S] (groups x channels-in-group x spatial, padded to powers of
two; channel index ``g*cpg + c``).  Splitting S into many chunks keeps the whole GPU
busy even when one group holds 21 M elements (29 channels at 256x256x160).  The group
tile follows the layout so that every tile is a contiguous slab of memory:
channels-first -> one group per program (its cpg channels are cpg contiguous runs);
channels-last -> all groups per program (a run of BLOCK_S whole pixels).

Forward = 3 kernels:
  1. ``_gn_stats_kernel``: per program and lane a Welford (mean, M2) with a scalar
     reciprocal count (lanes only go idle in the last iteration of a chunk, where they
     are fed their own mean, a no-op), then the lanes of each group are merged with
     Chan's formula M2 = sum M2_l + sum n_l (mean_l - mean)^2 into a per-(n, g, chunk)
     partial (count, mean, M2) -- all fp32, never E[x^2] - E[x]^2.
  2. ``_gn_combine_kernel``: per (n, g), Chan-combines the chunk partials (two passes
     over them: weighted mean, then M2) into mean and rstd = 1/sqrt(M2/count + eps).
  3. ``_gn_silu_fwd_kernel``: y = silu((x - (mean - bias_in)) * rstd * w + b).
Backward = 3 kernels (closed form in :mod:`.composite`):
  4. ``_gn_silu_bwd_reduce_kernel``: recomputes xhat, u, sigmoid(u) from x and the
     stats; per-(n, chunk, c) partial sums of gu, gu*xhat and xhat.
  5. ``_gn_silu_bwd_finalize_kernel``: per group, sums the partials over chunks and
     samples: dweight, dbias, dbias_in and the per-(n, g) coefficients m1, m2.
  6. ``_gn_silu_bwd_dx_kernel``: dx = rstd * (w*gu - m1 - xhat*m2).

Bytes each kernel pass must move per element of x (the DRAM roofline floor; e = element
size of x: 4 fp32, 2 fp16/bf16; per-channel and per-chunk side data is negligible):
  forward  = 3e (read x for the statistics, read x again, write y) -- a group does not
             fit on chip at the network's sizes, so x is necessarily read twice;
  backward = 5e (read x, dy for the reductions; read x, dy again, write dx).
Eager PyTorch for the same math moves far more (GroupNorm forward writes the
normalised tensor, SiLU reads and writes it again; backward reads the saved
normalised/activated tensors).

Everything is computed in fp32 whatever the input dtype (fp32/fp16/bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import composite, cpu_ext
from ._layout import as_layout_of, empty_in_layout, fresh, in_kernel_layout, layout_of, memory_format
from ._triton import KernelVariant, kernel, launch, next_power_of_2, sigmoid_, sum_
from .backends import cpu_implementation

Tensor = torch.Tensor

# Register tile (elements of x per loop iteration per program), all over 8 warps.
# Channels-first: 2048 = 8 contiguous elements per thread (16-byte fp16 loads), <= 64
# registers.  Channels-last: 1024 = 4 per thread; at 8 per thread its per-element
# channel coefficients need up to 146 registers, capping occupancy at 8 warps per SM.
TILE_CUDA = {"cf": 2048, "cl": 1024}
NUM_WARPS_CUDA = 8
TILE_INTERPRETED = 256
# Programs per sample the split reduction aims at: ~4 per SM on CUDA; in the
# interpreter a few, so the tests exercise the chunk split and the ragged last chunk.
PROGRAMS_PER_SM = 4
CHUNKS_INTERPRETED = 3
# G_TILE * CPG_PAD channel lanes above this do not fit a register tile.
MAX_CHANNEL_LANES = 1024
BLOCK_K = 64  # chunk partials combined per iteration in kernels 2 and 5


# --------------------------------------------------------------------------- kernels
@kernel
def _tile_coords(C, S, groups, cpg, n, gt, G_TILE: tl.constexpr, CPG_PAD: tl.constexpr,
                 BLOCK_S: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Channel index [G,P,1], channel mask [G,P,1], channel part of the offset [G,P,1]
    (int64, sample base included) and spatial lane index [1,1,B] of a program's tile."""
    g = gt * G_TILE + tl.arange(0, G_TILE)[:, None, None]
    cl = tl.arange(0, CPG_PAD)[None, :, None]
    j = tl.arange(0, BLOCK_S)[None, None, :]
    c = g * cpg + cl
    cmask = (g < groups) & (cl < cpg)
    base = n.to(tl.int64) * C * S
    if CHANNELS_LAST:
        coff = base + c.to(tl.int64)
    else:
        coff = base + c.to(tl.int64) * S
    return c, cmask, coff, j


@kernel
def _spatial_offset(coff, s, C, CHANNELS_LAST: tl.constexpr):
    """Offsets of tile elements at spatial indices ``s`` (int32, broadcast against coff)."""
    if CHANNELS_LAST:
        return coff + s.to(tl.int64) * C
    else:
        return coff + s


@kernel
def _channel_affine(W, B, BIAS_IN, MEAN, RSTD, n, c, cmask, C, groups, cpg,
                    HAS_BIAS_IN: tl.constexpr):
    """Per-channel (center, rstd, w, b) with xhat = (x - center) * rstd; center = mean - bias_in."""
    g = c // cpg
    mean = tl.load(MEAN + n * groups + g, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * groups + g, mask=cmask, other=0.0)
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    center = mean
    if HAS_BIAS_IN:
        center = mean - tl.load(BIAS_IN + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    return center, rstd, w, b


@kernel(do_not_specialize=("num_chunks",))
def _gn_stats_kernel(X, BIAS_IN, PCNT, PMEAN, PM2, C, S, chunk_len, num_chunks, groups, cpg,
                     G_TILE: tl.constexpr, CPG_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, HAS_BIAS_IN: tl.constexpr):
    """Pass 1: partial (count, mean, M2) of each group of the tile over one chunk of S."""
    gt = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    c, cmask, coff, j = _tile_coords(C, S, groups, cpg, n, gt, G_TILE, CPG_PAD, BLOCK_S,
                                     CHANNELS_LAST)
    if HAS_BIAS_IN:
        bias_in = tl.load(BIAS_IN + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    s_begin = k * chunk_len
    length = tl.minimum(chunk_len, S - s_begin)
    mean = tl.full([G_TILE, CPG_PAD, BLOCK_S], 0.0, tl.float32)
    m2 = tl.full([G_TILE, CPG_PAD, BLOCK_S], 0.0, tl.float32)
    for it in range(0, (length + BLOCK_S - 1) // BLOCK_S):
        s = it * BLOCK_S + j
        m = cmask & (s < length)
        x = tl.load(X + _spatial_offset(coff, s_begin + s, C, CHANNELS_LAST), mask=m, other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS_IN:
            x = x + bias_in
        # Every active lane has seen exactly it+1 values; idle lanes see their own mean.
        x = tl.where(m, x, mean)
        delta = x - mean
        mean = mean + delta * (1.0 / (it + 1))
        m2 = m2 + delta * (x - mean)
    # Values each lane saw: lanes go idle only at the end of the chunk.
    count = ((length - j + BLOCK_S - 1) // BLOCK_S).to(tl.float32)
    weight = tl.where(cmask, count, 0.0)
    n_g = sum_(sum_(weight, axis=2), axis=1)
    mean_g = sum_(sum_(weight * mean, axis=2), axis=1) / tl.maximum(n_g, 1.0)
    d = mean - mean_g[:, None, None]
    m2_g = sum_(sum_(tl.where(weight > 0, m2 + weight * d * d, 0.0), axis=2), axis=1)
    gi = gt * G_TILE + tl.arange(0, G_TILE)
    out = (n * groups + gi) * num_chunks + k
    gmask = gi < groups
    tl.store(PCNT + out, n_g, mask=gmask)
    tl.store(PMEAN + out, mean_g, mask=gmask)
    tl.store(PM2 + out, m2_g, mask=gmask)


@kernel(do_not_specialize=("num_chunks",))
def _gn_combine_kernel(PCNT, PMEAN, PM2, MEAN, RSTD, num_chunks, eps, BLOCK_K: tl.constexpr):
    """Pass 2: Chan-combine the chunk partials of one (n, g) into mean and rstd."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * num_chunks
    kk = tl.arange(0, BLOCK_K)
    acc_n = tl.full([BLOCK_K], 0.0, tl.float32)
    acc_s = tl.full([BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, num_chunks, BLOCK_K):
        m = k0 + kk < num_chunks
        cnt = tl.load(PCNT + base + k0 + kk, mask=m, other=0.0)
        acc_n += cnt
        acc_s += cnt * tl.load(PMEAN + base + k0 + kk, mask=m, other=0.0)
    total = sum_(acc_n, axis=0)
    mean = sum_(acc_s, axis=0) / total
    acc_m2 = tl.full([BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, num_chunks, BLOCK_K):
        m = k0 + kk < num_chunks
        cnt = tl.load(PCNT + base + k0 + kk, mask=m, other=0.0)
        d = tl.load(PMEAN + base + k0 + kk, mask=m, other=0.0) - mean
        acc_m2 += tl.load(PM2 + base + k0 + kk, mask=m, other=0.0) + cnt * d * d
    var = sum_(acc_m2, axis=0) / total
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, 1.0 / tl.sqrt(var + eps))


@kernel
def _gn_silu_fwd_kernel(X, Y, W, B, BIAS_IN, MEAN, RSTD, C, S, chunk_len, groups, cpg,
                        G_TILE: tl.constexpr, CPG_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, HAS_BIAS_IN: tl.constexpr):
    """Pass 3: y = silu(xhat * w + b) for one chunk of S, all channels."""
    gt = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    c, cmask, coff, j = _tile_coords(C, S, groups, cpg, n, gt, G_TILE, CPG_PAD, BLOCK_S,
                                     CHANNELS_LAST)
    center, rstd, w, b = _channel_affine(W, B, BIAS_IN, MEAN, RSTD, n, c, cmask, C, groups, cpg,
                                         HAS_BIAS_IN)
    scale = rstd * w
    s_begin = k * chunk_len
    length = tl.minimum(chunk_len, S - s_begin)
    for it in range(0, (length + BLOCK_S - 1) // BLOCK_S):
        s = it * BLOCK_S + j
        m = cmask & (s < length)
        off = _spatial_offset(coff, s_begin + s, C, CHANNELS_LAST)
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        u = (x - center) * scale + b
        tl.store(Y + off, (u * sigmoid_(u)).to(Y.dtype.element_ty), mask=m)


@kernel(do_not_specialize=("num_chunks",))
def _gn_silu_bwd_reduce_kernel(X, DY, W, B, BIAS_IN, MEAN, RSTD, PA, PB, PX, C, S, chunk_len,
                               num_chunks, groups, cpg,
                               G_TILE: tl.constexpr, CPG_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                               CHANNELS_LAST: tl.constexpr, HAS_BIAS_IN: tl.constexpr):
    """Backward 1: per-(n, chunk, c) sums of gu, gu*xhat and xhat (gu = dL/du)."""
    gt = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    c, cmask, coff, j = _tile_coords(C, S, groups, cpg, n, gt, G_TILE, CPG_PAD, BLOCK_S,
                                     CHANNELS_LAST)
    center, rstd, w, b = _channel_affine(W, B, BIAS_IN, MEAN, RSTD, n, c, cmask, C, groups, cpg,
                                         HAS_BIAS_IN)
    s_begin = k * chunk_len
    length = tl.minimum(chunk_len, S - s_begin)
    acc_a = tl.full([G_TILE, CPG_PAD, BLOCK_S], 0.0, tl.float32)
    acc_b = tl.full([G_TILE, CPG_PAD, BLOCK_S], 0.0, tl.float32)
    acc_x = tl.full([G_TILE, CPG_PAD, BLOCK_S], 0.0, tl.float32)
    for it in range(0, (length + BLOCK_S - 1) // BLOCK_S):
        s = it * BLOCK_S + j
        m = cmask & (s < length)
        off = _spatial_offset(coff, s_begin + s, C, CHANNELS_LAST)
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (x - center) * rstd, 0.0)
        u = xhat * w + b
        sig = sigmoid_(u)
        gu = dy * sig * (1.0 + u * (1.0 - sig))
        acc_a += gu
        acc_b += gu * xhat
        acc_x += xhat
    out = (n * num_chunks + k) * C + c
    sum_a = sum_(acc_a, axis=2)[:, :, None]
    sum_b = sum_(acc_b, axis=2)[:, :, None]
    sum_x = sum_(acc_x, axis=2)[:, :, None]
    tl.store(PA + out, sum_a, mask=cmask)
    tl.store(PB + out, sum_b, mask=cmask)
    tl.store(PX + out, sum_x, mask=cmask)


@kernel(do_not_specialize=("N", "num_chunks"))
def _gn_silu_bwd_finalize_kernel(PA, PB, PX, W, RSTD, DW, DB, DBIAS_IN, COEF1, COEF2, N, C, S,
                                 num_chunks, groups, cpg, CPG_PAD: tl.constexpr,
                                 BLOCK_K: tl.constexpr, HAS_BIAS_IN: tl.constexpr):
    """Backward 2 (one program per group): dweight, dbias, dbias_in and m1, m2 per (n, g)."""
    g = tl.program_id(0)
    cl = tl.arange(0, CPG_PAD)
    c = g * cpg + cl
    cmask = cl < cpg
    kk = tl.arange(0, BLOCK_K)[:, None]
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    inv_m = 1.0 / (cpg * S).to(tl.float32)
    dw = tl.full([CPG_PAD], 0.0, tl.float32)
    db = tl.full([CPG_PAD], 0.0, tl.float32)
    for n in range(0, N):
        acc_a = tl.full([BLOCK_K, CPG_PAD], 0.0, tl.float32)
        acc_b = tl.full([BLOCK_K, CPG_PAD], 0.0, tl.float32)
        acc_x = tl.full([BLOCK_K, CPG_PAD], 0.0, tl.float32)
        for k0 in range(0, num_chunks, BLOCK_K):
            m = (k0 + kk < num_chunks) & cmask[None, :]
            off = (n * num_chunks + k0 + kk).to(tl.int64) * C + c[None, :]
            acc_a += tl.load(PA + off, mask=m, other=0.0)
            acc_b += tl.load(PB + off, mask=m, other=0.0)
            acc_x += tl.load(PX + off, mask=m, other=0.0)
        sum_a = sum_(acc_a, axis=0)
        sum_b = sum_(acc_b, axis=0)
        m1 = sum_(w * sum_a, axis=0) * inv_m
        m2 = sum_(w * sum_b, axis=0) * inv_m
        tl.store(COEF1 + n * groups + g, m1)
        tl.store(COEF2 + n * groups + g, m2)
        if HAS_BIAS_IN:
            rstd = tl.load(RSTD + n * groups + g)
            dbias_in = rstd * (w * sum_a - S * m1 - m2 * sum_(acc_x, axis=0))
            tl.store(DBIAS_IN + n * C + c, dbias_in.to(DBIAS_IN.dtype.element_ty), mask=cmask)
        dw += sum_b
        db += sum_a
    tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=cmask)
    tl.store(DB + c, db.to(DB.dtype.element_ty), mask=cmask)


@kernel
def _gn_silu_bwd_dx_kernel(X, DY, DX, W, B, BIAS_IN, MEAN, RSTD, COEF1, COEF2, C, S, chunk_len,
                           groups, cpg, G_TILE: tl.constexpr, CPG_PAD: tl.constexpr,
                           BLOCK_S: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           HAS_BIAS_IN: tl.constexpr):
    """Backward 3: dx = rstd * (w*gu - m1 - xhat*m2) for one chunk of S, all channels."""
    gt = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    c, cmask, coff, j = _tile_coords(C, S, groups, cpg, n, gt, G_TILE, CPG_PAD, BLOCK_S,
                                     CHANNELS_LAST)
    center, rstd, w, b = _channel_affine(W, B, BIAS_IN, MEAN, RSTD, n, c, cmask, C, groups, cpg,
                                         HAS_BIAS_IN)
    g = c // cpg
    m1 = tl.load(COEF1 + n * groups + g, mask=cmask, other=0.0)
    m2 = tl.load(COEF2 + n * groups + g, mask=cmask, other=0.0)
    s_begin = k * chunk_len
    length = tl.minimum(chunk_len, S - s_begin)
    for it in range(0, (length + BLOCK_S - 1) // BLOCK_S):
        s = it * BLOCK_S + j
        m = cmask & (s < length)
        off = _spatial_offset(coff, s_begin + s, C, CHANNELS_LAST)
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        xhat = (x - center) * rstd
        u = xhat * w + b
        sig = sigmoid_(u)
        gu = dy * sig * (1.0 + u * (1.0 - sig))
        dx = rstd * (w * gu - m1 - xhat * m2)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class TileConfig:
    """Compile-time shape of a program's register tile (see module docstring)."""

    g_tile: int
    cpg_pad: int
    block_s: int
    num_warps: int


@dataclass(frozen=True)
class Plan:
    """How one (N, C, S, groups) problem is cut into programs."""

    n: int
    c: int
    s: int
    groups: int
    cpg: int
    tile: TileConfig
    chunk_len: int
    num_chunks: int
    channels_last: bool

    @property
    def grid(self) -> Tuple[int, int, int]:
        """(group tiles, chunks, samples)."""
        return (triton.cdiv(self.groups, self.tile.g_tile), self.num_chunks, self.n)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tile_config(groups: int, cpg: int, layout: str, cuda: bool) -> TileConfig:
    """The register tile for ``groups`` x ``cpg`` channels in ``layout`` ("cf"/"cl").

    On CUDA it depends on the channel configuration and layout only, so the compiled
    variants are exactly those :func:`aot_variants` lists.
    """
    cpg_pad = next_power_of_2(cpg)
    g_tile = next_power_of_2(groups) if layout == "cl" else 1
    lanes = g_tile * cpg_pad
    if lanes > MAX_CHANNEL_LANES:
        raise ValueError(f"group_norm_silu: {groups * cpg} channels in {groups} groups need "
                         f"{lanes} register lanes, more than the kernels' {MAX_CHANNEL_LANES}")
    tile = TILE_CUDA[layout] if cuda else TILE_INTERPRETED
    return TileConfig(g_tile, cpg_pad, max(1, tile // lanes), NUM_WARPS_CUDA)


def supported(groups: int, cpg: int) -> bool:
    """Whether the Triton kernels take this channel configuration in both layouts."""
    return next_power_of_2(groups) * next_power_of_2(cpg) <= MAX_CHANNEL_LANES


def make_plan(x: Tensor, groups: int) -> Plan:
    """Tile and chunk sizes for ``x`` (already in a kernel layout) on its device.

    Chunks are whole multiples of BLOCK_S (so lanes go idle only in a chunk's last
    iteration) and of 16 elements (16-byte aligned chunk starts, as the AOT variants
    assume).  CUDA aims at PROGRAMS_PER_SM programs per SM in total.
    """
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    cpg = c // groups
    layout = layout_of(x)
    cuda = x.device.type == "cuda"
    tile = tile_config(groups, cpg, layout, cuda)
    group_tiles = triton.cdiv(groups, tile.g_tile)
    if cuda:
        chunks_wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(x.device.index or 0),
                                    n * group_tiles)
        step = max(tile.block_s, 16)
    else:  # interpreter: cost is per tile operation, so no tile wider than S
        tile = TileConfig(tile.g_tile, tile.cpg_pad, min(tile.block_s, next_power_of_2(s)),
                          tile.num_warps)
        chunks_wanted = CHUNKS_INTERPRETED
        step = tile.block_s
    chunk_len = triton.cdiv(triton.cdiv(s, max(1, chunks_wanted)), step) * step
    return Plan(n, c, s, groups, cpg, tile, chunk_len, triton.cdiv(s, chunk_len), layout == "cl")


def _tile_constexprs(p: Plan, has_bias_in: bool) -> dict:
    return dict(G_TILE=p.tile.g_tile, CPG_PAD=p.tile.cpg_pad, BLOCK_S=p.tile.block_s,
                CHANNELS_LAST=p.channels_last, HAS_BIAS_IN=has_bias_in)


# --------------------------------------------------------------------------- launchers
def statistics(x: Tensor, bias_in: Optional[Tensor], groups: int, eps: float
               ) -> Tuple[Tensor, Tensor]:
    """Triton statistics: float32 ``(mean, rstd)`` (N, groups) of ``x + bias_in`` (kernels 1, 2).

    Also the statistics pass of the fused convolution's GroupNorm-SiLU prologue
    (:mod:`.fused_conv3d`)."""
    x = in_kernel_layout(x)
    p = make_plan(x, groups)
    dev, f32 = x.device, torch.float32
    has_bias_in = bias_in is not None
    bias_in_arg = bias_in.contiguous() if has_bias_in else x  # dummy pointer, never read
    partial = [fresh(torch.empty((p.n, groups, p.num_chunks), dtype=f32, device=dev))
               for _ in range(3)]
    mean = fresh(torch.empty((p.n, groups), dtype=f32, device=dev))
    rstd = fresh(torch.empty((p.n, groups), dtype=f32, device=dev))
    launch(_gn_stats_kernel, p.grid, dev, x, bias_in_arg, partial[0], partial[1], partial[2],
           p.c, p.s, p.chunk_len, p.num_chunks, groups, p.cpg, num_warps=p.tile.num_warps,
           **_tile_constexprs(p, has_bias_in))
    launch(_gn_combine_kernel, (p.n * groups,), dev, partial[0], partial[1], partial[2],
           mean, rstd, p.num_chunks, float(eps), num_warps=2, BLOCK_K=BLOCK_K)
    return mean, rstd


def apply(x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor], mean: Tensor,
          rstd: Tensor, groups: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Triton ``silu(GN(x + bias_in))`` from given statistics (kernel 3), in x's layout and
    ``dtype`` (default x.dtype; the conv backward recomputes its input with it in fp32)."""
    x = in_kernel_layout(x)
    p = make_plan(x, groups)
    has_bias_in = bias_in is not None
    bias_in_arg = bias_in.contiguous() if has_bias_in else x  # dummy pointer, never read
    y = fresh(empty_in_layout(x, dtype))
    launch(_gn_silu_fwd_kernel, p.grid, x.device, x, y, weight.contiguous(), bias.contiguous(),
           bias_in_arg, mean.contiguous(), rstd.contiguous(), p.c, p.s, p.chunk_len, groups, p.cpg,
           num_warps=p.tile.num_warps, **_tile_constexprs(p, has_bias_in))
    return y


def forward(x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor], groups: int,
            eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton forward: ``(y, mean, rstd)``; y like x (dtype, layout), stats float32 (N, groups).

    Runs the compiled kernels for CUDA tensors and the interpreter for CPU tensors.
    """
    mean, rstd = statistics(x, bias_in, groups, eps)
    return apply(x, weight, bias, bias_in, mean, rstd, groups), mean, rstd


def backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor],
             mean: Tensor, rstd: Tensor, groups: int
             ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Triton backward: ``(dx, dweight, dbias, dbias_in or None)`` from x and the stats."""
    x = in_kernel_layout(x)
    dy = as_layout_of(dy, x)
    p = make_plan(x, groups)
    dev, f32 = x.device, torch.float32
    has_bias_in = bias_in is not None
    bias_in_arg = bias_in.contiguous() if has_bias_in else x
    weight, bias = weight.contiguous(), bias.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    partial = [fresh(torch.empty((p.n, p.num_chunks, p.c), dtype=f32, device=dev))
               for _ in range(3)]
    coef = [fresh(torch.empty((p.n, groups), dtype=f32, device=dev)) for _ in range(2)]
    dx = fresh(empty_in_layout(x))
    dweight = fresh(weight.new_empty(weight.shape))
    dbias = fresh(bias.new_empty(bias.shape))
    dbias_in = fresh(bias_in_arg.new_empty(bias_in_arg.shape)) if has_bias_in else None
    grid = p.grid
    consts = _tile_constexprs(p, has_bias_in)
    launch(_gn_silu_bwd_reduce_kernel, grid, dev, x, dy, weight, bias, bias_in_arg, mean,
           rstd, partial[0], partial[1], partial[2], p.c, p.s, p.chunk_len, p.num_chunks, groups,
           p.cpg, num_warps=p.tile.num_warps, **consts)
    launch(_gn_silu_bwd_finalize_kernel, (groups,), dev, partial[0], partial[1], partial[2],
           weight, rstd, dweight, dbias, dbias_in if has_bias_in else dweight, coef[0], coef[1],
           p.n, p.c, p.s, p.num_chunks, groups, p.cpg, num_warps=2, CPG_PAD=p.tile.cpg_pad,
           BLOCK_K=BLOCK_K, HAS_BIAS_IN=has_bias_in)
    launch(_gn_silu_bwd_dx_kernel, grid, dev, x, dy, dx, weight, bias, bias_in_arg, mean, rstd,
           coef[0], coef[1], p.c, p.s, p.chunk_len, groups, p.cpg, num_warps=p.tile.num_warps,
           **consts)
    return dx, dweight, dbias, dbias_in


# --------------------------------------------------------------------------- custom ops
# One schema per op; a kernel per device (CUDA: Triton; CPU: the implementation
# backends.cpu_implementation picks -- the C++ kernels, which register themselves for
# this schema's CPU key, the composite, or the Triton interpreter), a fake kernel and
# autograd.  float64 inputs and channel counts beyond the register tile go to the
# composite on every device (the Triton kernels compute in fp32 with at most
# MAX_CHANNEL_LANES lanes).
_FORWARD = {"triton": forward, "cpp": cpu_ext.gn_silu_forward, "composite": composite.gn_silu_forward}
_BACKWARD = {"triton": backward, "cpp": cpu_ext.gn_silu_backward, "composite": composite.gn_silu_backward}


def _kernels_take(x: Tensor, groups: int) -> bool:
    """Whether the Triton and C++ kernels take ``x`` (else the composite runs)."""
    return x.dtype != torch.float64 and supported(groups, x.shape[1] // groups)


def _cuda_implementation(x: Tensor, groups: int) -> str:
    return "triton" if _kernels_take(x, groups) else "composite"


def _cpu_implementation(x: Tensor, groups: int) -> str:
    ok = _kernels_take(x, groups)
    return cpu_implementation(triton_ok=ok, cpp_ok=ok)


def _conform(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in the layout the fake implementation promises (that of ``empty_in_layout(like)``)."""
    want = layout_of(like) or "cf"
    if layout_of(t) == want:
        return t
    return t.contiguous(memory_format=memory_format(want, t.dim()))


def _run_forward(impl: str, x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor],
                 groups: int, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _FORWARD[impl](x, weight, bias, bias_in, groups, eps)
    return _conform(y, x), mean, rstd


def _run_backward(impl: str, dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                  bias_in: Optional[Tensor], mean: Tensor, rstd: Tensor, groups: int
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dweight, dbias, dbias_in = _BACKWARD[impl](dy, x, weight, bias, bias_in, mean, rstd, groups)
    if dbias_in is None:
        dbias_in = x.new_empty((0,))
    return _conform(dx, x), dweight, dbias, dbias_in


@torch.library.custom_op("patchddm::gn_silu_fwd", mutates_args=(), device_types="cuda")
def gn_silu_fwd(x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor], groups: int,
                eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward: ``(y, mean, rstd)``; only x (+bias_in) and the stats are kept for backward."""
    return _run_forward(_cuda_implementation(x, groups), x, weight, bias, bias_in, groups, eps)


@gn_silu_fwd.register_kernel("cpu")
def _gn_silu_fwd_cpu(x, weight, bias, bias_in, groups, eps):
    return _run_forward(_cpu_implementation(x, groups), x, weight, bias, bias_in, groups, eps)


@gn_silu_fwd.register_fake
def _gn_silu_fwd_fake(x, weight, bias, bias_in, groups, eps):
    stats = (x.shape[0], groups)
    return (empty_in_layout(x), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("patchddm::gn_silu_bwd", mutates_args=(), device_types="cuda")
def gn_silu_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, bias_in: Optional[Tensor],
                mean: Tensor, rstd: Tensor, groups: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: ``(dx, dweight, dbias, dbias_in)``; dbias_in is empty (0,) without bias_in."""
    return _run_backward(_cuda_implementation(x, groups), dy, x, weight, bias, bias_in, mean, rstd,
                         groups)


@gn_silu_bwd.register_kernel("cpu")
def _gn_silu_bwd_cpu(dy, x, weight, bias, bias_in, mean, rstd, groups):
    return _run_backward(_cpu_implementation(x, groups), dy, x, weight, bias, bias_in, mean, rstd,
                         groups)


@gn_silu_bwd.register_fake
def _gn_silu_bwd_fake(dy, x, weight, bias, bias_in, mean, rstd, groups):
    dbias_in = x.new_empty((0,)) if bias_in is None else bias_in.new_empty(bias_in.shape)
    return (empty_in_layout(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape),
            dbias_in)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, bias_in, groups, _eps = inputs
    _y, mean, rstd = output
    # weight and bias are parameters (alive anyway); x, bias_in and the (N, groups) stats
    # are the only activation memory this op keeps.
    ctx.save_for_backward(x, weight, bias, bias_in, mean, rstd)
    ctx.groups = groups
    ctx.has_bias_in = bias_in is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, bias_in, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dbias_in = gn_silu_bwd(dy, x, weight, bias, bias_in, mean, rstd, ctx.groups)
    return dx, dweight, dbias, (dbias_in if ctx.has_bias_in else None), None, None


gn_silu_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_args(x: Tensor, weight: Tensor, bias: Tensor, groups: int,
                bias_in: Optional[Tensor]) -> None:
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if x.numel() == 0:
        raise ValueError(f"group_norm_silu: x is empty, shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"group_norm_silu: x must be floating point, got {x.dtype}")
    if not isinstance(groups, int) or groups <= 0 or c % groups:
        raise ValueError(f"group_norm_silu: groups={groups!r} must be a positive divisor of "
                         f"the {c} channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (c,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({c},), got {tuple(t.shape)}")
    if bias_in is not None and tuple(bias_in.shape) != (n, c):
        raise ValueError(f"group_norm_silu: bias_in must have shape ({n}, {c}), "
                         f"got {tuple(bias_in.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("bias_in", bias_in)):
        if t is not None and t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device}, x on {x.device}")


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float = 1e-5,
                    bias_in: Optional[Tensor] = None) -> Tensor:
    """``SiLU(GroupNorm(x + bias_in))``, statistics in fp32, output in ``x.dtype`` and layout.

    ``x`` is (N, C, *spatial) in fp32/fp16/bf16 (fp64 runs the composite), contiguous or
    channels-last; ``weight``/``bias`` are (C,); ``bias_in`` is an optional (N, C) bias
    added before the normalisation and included in its statistics.  For backward only
    ``x``, ``bias_in`` and two (N, groups) float32 tensors are saved.
    """
    _check_args(x, weight, bias, groups, bias_in)
    return gn_silu_fwd(x, weight, bias, bias_in, groups, float(eps))[0]


# --------------------------------------------------------------------------- AOT variants
NETWORK_GROUPS = 29
NETWORK_CHANNELS = (29, 87, 116)  # level widths 29/87/116 -> 1, 3, 4 channels per group
TRITON_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_variants(dtypes: Sequence[str] = ("fp32", "fp16", "bf16"),
                 layouts: Sequence[str] = ("cf", "cl")) -> List[KernelVariant]:
    """Every compiled specialisation the launchers use for the network's GroupNorms.

    x, dy, y, dx and bias_in share the activation dtype (autocast produces them all in
    fp16/bf16); weight, bias, statistics and partial sums are fp32.  cpg == 1 is
    specialised to a constant exactly like the JIT specialises an integer argument 1.
    """
    f32 = "*fp32"
    out = [KernelVariant("gn_combine", _gn_combine_kernel,
                         dict(PCNT=f32, PMEAN=f32, PM2=f32, MEAN=f32, RSTD=f32, eps="fp32"),
                         dict(BLOCK_K=BLOCK_K), 2)]
    cpgs = sorted({c // NETWORK_GROUPS for c in NETWORK_CHANNELS})
    # cpg 3 and 4 share CPG_PAD 4 (cpg is a runtime argument); cpg 1 is a JIT constant.
    kinds = {(next_power_of_2(cpg), cpg == 1): cpg for cpg in cpgs}
    for (cpg_pad, cpg_one), cpg in kinds.items():
        cpg_tag = "cpg1" if cpg_one else f"cpg_pad{cpg_pad}"
        cpg_const = {"cpg": 1} if cpg_one else {}
        for has_bias_in in (False, True):
            bias_tag = "bias_in" if has_bias_in else "no_bias_in"
            fin = dict(CPG_PAD=cpg_pad, BLOCK_K=BLOCK_K, HAS_BIAS_IN=has_bias_in, **cpg_const)
            for dt in (dtypes if has_bias_in else ("-",)):  # DBIAS_IN: bias_in's dtype or dummy
                out.append(KernelVariant(
                    f"gn_silu_bwd_finalize[{dt},{cpg_tag},{bias_tag}]", _gn_silu_bwd_finalize_kernel,
                    dict(PA=f32, PB=f32, PX=f32, W=f32, RSTD=f32, DW=f32, DB=f32,
                         DBIAS_IN=f32 if dt == "-" else f"*{dt}", COEF1=f32, COEF2=f32),
                    fin, 2, aligned=("S",)))
            for dt in dtypes:
                act = f"*{dt}"
                for layout in layouts:
                    t = tile_config(NETWORK_GROUPS, cpg, layout, cuda=True)
                    consts = dict(G_TILE=t.g_tile, CPG_PAD=t.cpg_pad, BLOCK_S=t.block_s,
                                  CHANNELS_LAST=layout == "cl", HAS_BIAS_IN=has_bias_in, **cpg_const)
                    tag = f"[{dt},{layout},{cpg_tag},{bias_tag}]"
                    common = dict(W=f32, B=f32, BIAS_IN=act, MEAN=f32, RSTD=f32)
                    aligned = ("S", "chunk_len")
                    out += [
                        KernelVariant("gn_stats" + tag, _gn_stats_kernel,
                                      dict(X=act, BIAS_IN=act, PCNT=f32, PMEAN=f32, PM2=f32),
                                      consts, t.num_warps, aligned),
                        KernelVariant("gn_silu_fwd" + tag, _gn_silu_fwd_kernel,
                                      dict(common, X=act, Y=act), consts, t.num_warps, aligned),
                        KernelVariant("gn_silu_bwd_reduce" + tag, _gn_silu_bwd_reduce_kernel,
                                      dict(common, X=act, DY=act, PA=f32, PB=f32, PX=f32),
                                      consts, t.num_warps, aligned),
                        KernelVariant("gn_silu_bwd_dx" + tag, _gn_silu_bwd_dx_kernel,
                                      dict(common, X=act, DY=act, DX=act, COEF1=f32, COEF2=f32),
                                      consts, t.num_warps, aligned),
                    ]
    return out
