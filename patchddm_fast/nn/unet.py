"""The PatchDDM 3D U-Net (PAPER.md, "Reference network"), with an engine underneath.

Structure is exactly the paper's: no attention, averaging skips, 2 encoder / 3 decoder
residual blocks per level, 29 GroupNorm groups, zero-initialised output convolutions.
What we add is *how* it runs: the GroupNorm-SiLU pairs and skip averages go through
:mod:`patchddm_fast.nn.backend` (``ops="reference"`` is the paper's code,
``ops="fused"`` our custom ops), and ``checkpoint`` trades recompute for activation
memory at the granularity of one residual block or one whole level.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from patchddm_fast.nn import backend

CHECKPOINT_MODES = ("none", "block", "level")

PRESETS = {
    # PAPER.md: t1, t1ce, t2, flair, 3 coordinate channels, noisy mask.
    "patchddm": dict(in_channels=8),
    # FullRes / HalfRes: 4 MR channels + noisy mask, no coordinates.
    "fullres": dict(in_channels=5),
    "halfres": dict(in_channels=5),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps: dim//2 cosines, dim//2 sines, zero pad if odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NormAct(nn.GroupNorm):
    """GroupNorm followed by SiLU, optionally with a per-channel bias added before the norm.

    A GroupNorm subclass so parameters keep the reference code's names and shapes; the
    computation is delegated to the selected ops backend.
    """

    ops: str = "reference"

    def forward(self, x: torch.Tensor, bias_in: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        return backend.group_norm_silu(self.ops, x, self.weight, self.bias, self.num_groups, self.eps, bias_in)


class ResBlock(nn.Module):
    """GN-SiLU-Conv, + Linear(SiLU(emb)) as channel bias, GN-SiLU-Dropout-Conv(zero init), + shortcut."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = NormAct(groups, cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = NormAct(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv3d(cout, cout, 3, padding=1))
        self.shortcut = nn.Identity() if cin == cout else nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, bias_in=self.emb_proj(emb_act).to(h.dtype))
        h = self.conv2(self.dropout(h))
        return self.shortcut(x) + h


class Downsample(nn.Conv3d):
    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv3d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EncoderLevel(nn.Module):
    def __init__(self, blocks: Sequence[ResBlock], down: Optional[Downsample]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.down = down

    def forward(self, h: torch.Tensor, emb_act: torch.Tensor, ckpt_blocks: bool) -> List[torch.Tensor]:
        """Returns every skip this level pushes; the last one is the level's output."""
        outs = []
        for block in self.blocks:
            h = _maybe_checkpoint(block, ckpt_blocks, h, emb_act)
            outs.append(h)
        if self.down is not None:
            h = self.down(h)
            outs.append(h)
        return outs


class DecoderLevel(nn.Module):
    def __init__(self, blocks: Sequence[ResBlock], up: Optional[Upsample], skip_mode: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.up = up
        self.skip_mode = skip_mode

    def forward(self, h: torch.Tensor, skips: Sequence[torch.Tensor], emb_act: torch.Tensor, ckpt_blocks: bool) -> torch.Tensor:
        ops = self.blocks[0].norm1.ops
        for block, skip in zip(self.blocks, skips):
            if self.skip_mode == "average":
                h = backend.average_skip(ops, h, skip)
            else:
                h = torch.cat([h, skip], dim=1)
            h = _maybe_checkpoint(block, ckpt_blocks, h, emb_act)
        if self.up is not None:
            h = self.up(h)
        return h


def _maybe_checkpoint(fn, enabled: bool, *args):
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class UNet3D(nn.Module):
    """PatchDDM's 3D U-Net.  ``UNet3D.from_preset("patchddm")`` has exactly 24,260,299 parameters.

    Args:
        in_channels: image channels + (3 coordinate channels) + 1 noisy mask channel.
        out_channels: predicted noise channels (1).
        base_width: channels at the finest level (29 in the paper).
        channel_mult: width multiplier per level; ``len(channel_mult)`` levels, one
            stride-2 downsampling between consecutive levels.
        enc_blocks / dec_blocks: residual blocks per level in the encoder / decoder.
        mid_blocks: residual blocks in the middle.
        groups: GroupNorm groups everywhere.
        skip: ``"average"`` (the paper: h = (h + skip)/2) or ``"concat"`` (the usual U-Net,
            for the paper's ablation; decoder blocks then see the summed width).
        ops: ``"reference"`` or ``"fused"`` (see :mod:`patchddm_fast.nn.backend`).
        checkpoint: ``"none"``, ``"block"`` (recompute each residual block in backward) or
            ``"level"`` (recompute each encoder/decoder level as one unit).
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 1,
        base_width: int = 29,
        channel_mult: Sequence[int] = (1, 3, 4, 4, 4, 4, 4),
        enc_blocks: int = 2,
        dec_blocks: int = 3,
        mid_blocks: int = 2,
        groups: int = 29,
        time_embed_dim: Optional[int] = None,
        dropout: float = 0.0,
        skip: str = "average",
        ops: str = "reference",
        checkpoint: str = "none",
    ):
        super().__init__()
        if skip not in ("average", "concat"):
            raise ValueError(f"skip must be 'average' or 'concat', got {skip!r}")
        if dec_blocks != enc_blocks + 1:
            raise ValueError("dec_blocks must be enc_blocks + 1: every encoder skip is consumed by one decoder block")
        widths = [base_width * m for m in channel_mult]
        bad = [w for w in widths if w % groups]
        if bad:
            raise ValueError(f"every level width must be divisible by groups={groups}; got widths {widths}")
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, base_width=base_width,
            channel_mult=tuple(channel_mult), enc_blocks=enc_blocks, dec_blocks=dec_blocks,
            mid_blocks=mid_blocks, groups=groups, time_embed_dim=time_embed_dim, dropout=dropout,
            skip=skip,
        )
        self.levels = len(channel_mult)
        self.base_width = base_width
        emb_dim = time_embed_dim or widths[-1]
        self.time_embed = nn.Sequential(nn.Linear(base_width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv3d(in_channels, base_width, 3, padding=1)

        skip_widths = [base_width]
        ch = base_width
        self.encoder = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(enc_blocks):
                blocks.append(ResBlock(ch, width, emb_dim, groups, dropout))
                ch = width
                skip_widths.append(ch)
            down = Downsample(ch) if level < self.levels - 1 else None
            if down is not None:
                skip_widths.append(ch)
            self.encoder.append(EncoderLevel(blocks, down))
        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, dropout) for _ in range(mid_blocks)])

        pops = skip_widths[::-1]
        self.decoder = nn.ModuleList()
        j = 0
        for level in reversed(range(self.levels)):
            blocks = []
            for _ in range(dec_blocks):
                cin = ch if skip == "average" else ch + pops[j]
                # Each block outputs the width of the next skip it will meet (averaging needs equal widths).
                cout = pops[j + 1] if j + 1 < len(pops) else base_width
                blocks.append(ResBlock(cin, cout, emb_dim, groups, dropout))
                ch = cout
                j += 1
            up = Upsample(ch) if level > 0 else None
            self.decoder.append(DecoderLevel(blocks, up, skip))
        self.out_norm = NormAct(groups, ch)
        self.conv_out = zero_module(nn.Conv3d(ch, out_channels, 3, padding=1))
        self.set_ops(ops)
        self.set_checkpoint(checkpoint)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet3D":
        """The paper's network: ``"patchddm"`` (8 input channels), ``"fullres"`` / ``"halfres"`` (5)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def set_ops(self, ops: str) -> "UNet3D":
        backend.check_backend(ops)
        self.ops = ops
        for m in self.modules():
            if isinstance(m, NormAct):
                m.ops = ops
        return self

    def set_checkpoint(self, mode: str) -> "UNet3D":
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {mode!r}")
        self.checkpoint = mode
        return self

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the top)."""
        return 2 ** (self.levels - 1)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"UNet3D expects (N, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"UNet3D expects {self.config['in_channels']} input channels, got {x.shape[1]}")
        m = self.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not a multiple of {m} (= 2^(levels-1) for "
                f"{self.levels} levels); pad the volume (patchddm_fast.data.patches.pad_to_multiple, "
                "which the sampler applies automatically)"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.base_width).to(self.time_embed[0].weight.dtype))
        emb_act = F.silu(emb)
        ckpt_blocks = self.checkpoint == "block"
        ckpt_levels = self.checkpoint == "level"

        h = self.conv_in(x)
        skips: List[torch.Tensor] = [h]
        for level in self.encoder:
            outs = _maybe_checkpoint(level, ckpt_levels, h, emb_act, ckpt_blocks)
            skips.extend(outs)
            h = outs[-1]
            del outs
        for block in self.middle:
            h = _maybe_checkpoint(block, ckpt_blocks or ckpt_levels, h, emb_act)
        for level in self.decoder:
            n = len(level.blocks)
            level_skips = [skips.pop() for _ in range(n)]
            h = _maybe_checkpoint(level, ckpt_levels, h, level_skips, emb_act, ckpt_blocks)
            del level_skips  # consumed: free as soon as the level no longer needs them
        return self.conv_out(self.out_norm(h))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
