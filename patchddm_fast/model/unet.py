"""The PatchDDM 3D U-Net (PAPER.md, "Reference network"), with an engine underneath.

Structure is exactly the paper's: no attention, averaging skips, 2 encoder / 3 decoder
residual blocks per level, 29 GroupNorm groups, zero-initialised output convolutions.
What we add is *how* it runs, given as one :class:`~patchddm_fast.model.execution.policy.ExecutionPolicy`
(``UNet3D(..., policy=...)`` or :meth:`UNet3D.apply_policy`):

* ``ops``: the GroupNorm-SiLU pairs and skip averages go through
  :mod:`patchddm_fast.model.backend` (``"reference"`` is the paper's code, ``"fused"`` our
  custom ops);
* ``recompute``: trades recompute for activation memory at the granularity of one residual
  block or one whole level, or selectively (GroupNorm-SiLU and upsampling recomputed,
  convolution outputs kept; see :mod:`patchddm_fast.model.execution.recompute`);
* ``offload``: skips and saved activations in host memory
  (:mod:`patchddm_fast.model.execution.offload`);
* ``tiled``: no-grad inference through the slab-wise executor
  (:mod:`patchddm_fast.model.execution.tiled`).

The network's structure is written once, as :attr:`UNet3D.stages`: the ordered list the
plain forward iterates and the tiled executor walks.
"""
from __future__ import annotations

import math
import contextlib
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from patchddm_fast.model import backend
from patchddm_fast.model.execution.offload import CpuStore, Offload, check_offload
from patchddm_fast.model.execution.policy import ExecutionPolicy
from patchddm_fast.model.execution.recompute import block_conv2, prep_conv
from patchddm_fast.model.execution.skips import SkipStack
from patchddm_fast.model.execution.tiled import tiled_forward
from patchddm_fast.model.method import Method, get_method

# none: plain autograd.
# selective: every GroupNorm-SiLU -> conv pair and every upsample -> conv pair saves only
#   its input and recomputes the cheap part in backward; no convolution is recomputed.
# block: a residual block saves only its input (and the time bias); backward recomputes
#   its first convolution (never the second) -- half a block of recompute.
# level: block, and each encoder level saves only its input: its skips are freed as soon
#   as the decoder has consumed them, and backward recomputes the level.
RECOMPUTE_MODES = ("none", "selective", "block", "level")


def check_recompute(mode: str) -> str:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    return mode



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
    """GN-SiLU-Conv, + Linear(SiLU(emb)) as channel bias, GN-SiLU-Dropout-Conv(zero init), + shortcut.

    ``recompute`` (set by ``UNet3D.apply_policy``): "none"; "selective" -- each
    GN-SiLU -> conv pair saves only its input; "block" -- the whole block saves only its
    input and the time bias (see :mod:`patchddm_fast.model.execution.recompute`).
    """

    recompute: str = "none"

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = NormAct(groups, cin)
        self.conv1 = backend.Conv3d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = NormAct(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(backend.Conv3d(cout, cout, 3, padding=1))
        self.shortcut = nn.Identity() if cin == cout else backend.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        if self.recompute != "none" and torch.is_grad_enabled() and not (self.training and self.dropout.p > 0):
            return self._forward_recompute(x, emb_act)
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, bias_in=self.emb_proj(emb_act).to(h.dtype))
        h = self.conv2(self.dropout(h))
        return backend.residual_add(self.norm1.ops, h, self.shortcut(x))

    def _forward_recompute(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        n1, n2 = self.norm1, self.norm2
        if self.recompute == "selective":
            h = prep_conv(n1, self.conv1, [x], [n1.weight, n1.bias])
            bias = self.emb_proj(emb_act).to(h.dtype)
            h = prep_conv(lambda h, b: self.dropout(n2(h, bias_in=b)), self.conv2, [h, bias], [n2.weight, n2.bias])
        else:
            h = block_conv2(self, x, self.emb_proj(emb_act))
        return backend.residual_add(self.norm1.ops, h, self.shortcut(x))


class Downsample(backend.Conv3d):
    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class Upsample(nn.Module):
    recompute_upsample: bool = False  # recompute the nearest upsampling in backward, save the low-res input

    def __init__(self, ch: int):
        super().__init__()
        self.conv = backend.Conv3d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_upsample:
            return prep_conv(_upsample2x, self.conv, [x])
        return self.conv(_upsample2x(x))


class EncoderLevel(nn.Module):
    def __init__(self, blocks: Sequence[ResBlock], down: Optional[Downsample]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.down = down

    def forward(self, h: torch.Tensor, emb_act: torch.Tensor) -> List[torch.Tensor]:
        """Returns every skip this level pushes; the last one is the level's output."""
        outs = []
        for block in self.blocks:
            h = block(h, emb_act)
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

    def forward(self, h: Any, skips: Iterable[torch.Tensor], emb_act: torch.Tensor) -> torch.Tensor:
        """``skips`` may be lazy (an offloading skip store fetches each one just before its block).

        ``h`` may be a one-element list the caller hands its only reference over in: the level
        input then dies as soon as it is consumed instead of living until the level returns.
        """
        if isinstance(h, list):
            h = h.pop()
        ops = self.blocks[0].norm1.ops
        skips = iter(skips)  # not zip(): zip's cached result tuple would keep the last skip alive
        for block in self.blocks:
            skip = next(skips)
            if self.skip_mode == "average":
                h = backend.average_skip(ops, h, skip)
            else:
                h = torch.cat([h, skip], dim=1)
            del skip  # consumed: free it (or let the store reuse it) before the block runs
            h = block(h, emb_act)
        if self.up is not None:
            h = self.up(h)
        return h


class Stage(NamedTuple):
    """One step of the U-Net's forward, in order: ``kind`` is "input" (conv_in; its output
    is the first skip), "encoder" (an :class:`EncoderLevel`; pushes its skips), "middle" (a
    :class:`ResBlock`), "decoder" (a :class:`DecoderLevel`; pops one skip per block) or
    "output" (out_norm, conv_out).  ``modules`` are the stage's modules."""

    kind: str
    modules: Tuple[nn.Module, ...]


STAGE_KINDS = ("input", "encoder", "middle", "decoder", "output")


def _maybe_checkpoint(fn, enabled: bool, *args):
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class UNet3D(nn.Module):
    """PatchDDM's 3D U-Net.  ``UNet3D.from_method("patchddm")`` has exactly 24,260,299 parameters.

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
        policy: how the network runs (:class:`ExecutionPolicy`; default: the reference ops,
            no recompute, no offload, no tiling).  Its ``recompute`` is ``"none"``;
            ``"selective"`` (GroupNorm-SiLU and upsampling recomputed in backward, no
            convolution recomputed); ``"block"`` (each residual block keeps only its input;
            backward recomputes its first convolution); ``"level"`` (block, and each encoder
            level keeps only its input and is recomputed in backward).  See
            ``RECOMPUTE_MODES`` and :mod:`patchddm_fast.model.execution.recompute`.
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
        time_freq_dim: Optional[int] = None,
        dropout: float = 0.0,
        skip: str = "average",
        policy: Optional[ExecutionPolicy] = None,
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
            mid_blocks=mid_blocks, groups=groups, time_embed_dim=time_embed_dim, time_freq_dim=time_freq_dim, dropout=dropout,
            skip=skip,
        )
        self.levels = len(channel_mult)
        self.base_width = base_width
        emb_dim = time_embed_dim or widths[-1]
        # The sinusoid has base_width frequencies in the paper; tiny demo networks may ask for more.
        self.time_freq_dim = time_freq_dim or base_width
        self.time_embed = nn.Sequential(nn.Linear(self.time_freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = backend.Conv3d(in_channels, base_width, 3, padding=1)

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
        self.conv_out = zero_module(backend.Conv3d(ch, out_channels, 3, padding=1))
        # The structure, once: the plain forward iterates it and the tiled executor walks it.
        # A plain list (not a ModuleList): the modules are registered above, under their names.
        self.stages: List[Stage] = (
            [Stage("input", (self.conv_in,))]
            + [Stage("encoder", (level,)) for level in self.encoder]
            + [Stage("middle", (block,)) for block in self.middle]
            + [Stage("decoder", (level,)) for level in self.decoder]
            + [Stage("output", (self.out_norm, self.conv_out))]
        )
        self.apply_policy(policy or ExecutionPolicy())

    # ------------------------------------------------------------------ configuration
    @classmethod
    def from_method(cls, method: Union[str, Method], target: str = "binary", **overrides) -> "UNet3D":
        """The paper's network for a method (:mod:`patchddm_fast.model.method`): ``"patchddm"``
        has 8 input channels, ``"fullres"`` / ``"halfres"`` / ``"patches"`` 5 (binary target)."""
        return cls(**{**get_method(method).network_channels(target), **overrides})

    def apply_policy(self, policy: ExecutionPolicy, store: Optional[CpuStore] = None) -> "UNet3D":
        """Run with ``policy`` from now on: installs the ops backend on every norm and
        convolution, the recompute mode on every block, and the offload handler (offload
        "skips"/"all"; ``store`` says where host copies go, default: pinned memory on CUDA,
        clones on CPU -- the memory simulator passes its tracker's).  Returns the model."""
        backend.check_backend(policy.ops)
        check_recompute(policy.recompute)
        check_offload(policy.offload)
        for m in self.modules():
            if isinstance(m, (NormAct, backend.Conv3d)):
                m.ops = policy.ops
            if isinstance(m, ResBlock):
                m.recompute = {"none": "none", "selective": "selective"}.get(policy.recompute, "block")
            if isinstance(m, Upsample):
                m.recompute_upsample = policy.recompute != "none"
        self._offload = (None if policy.offload == "none"
                         else Offload(policy.offload, store=store, min_bytes=policy.offload_min_bytes))
        self.policy = policy
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
        if self.policy.tiled and not torch.is_grad_enabled():
            return tiled_forward(self, x, t, skips=self._skip_store(), slab_rows=self.policy.slab_rows)
        ctx = contextlib.nullcontext()
        if self._offload is not None:
            ctx = self._offload.context(next(self.parameters()).device)
        with ctx:
            return self._forward(x, t)

    def _skip_store(self) -> SkipStack:
        """Where the encoder's skips wait: on the device, or in host memory under offload."""
        if self._offload is None:
            return SkipStack()
        return self._offload.skip_store(next(self.parameters()).device)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """SiLU of the time embedding: the per-block bias input ``emb_act``."""
        emb = self.time_embed(timestep_embedding(t, self.time_freq_dim).to(self.time_embed[0].weight.dtype))
        return F.silu(emb)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb_act = self.time_embedding(t)
        # Blocks recompute inside themselves (ResBlock.recompute); only encoder levels use
        # torch's checkpoint, so their skips die once the decoder has consumed them.
        recompute = self.policy.recompute
        ckpt_levels = recompute == "level"
        skips = self._skip_store()
        # One loop over the stages, every tensor reference local to it: a level's input
        # dies as soon as nothing needs it (see DecoderLevel.forward for the hand-over).
        for kind, modules in self.stages:
            if kind == "input":
                h = modules[0](x)
                skips.push(h)
            elif kind == "encoder":
                outs = _maybe_checkpoint(modules[0], ckpt_levels, h, emb_act)
                for o in outs:
                    skips.push(o)
                h = outs[-1]
                del outs
            elif kind == "middle":
                h = modules[0](h, emb_act)
            elif kind == "decoder":
                level = modules[0]
                level_skips = skips.take(len(level.blocks), lazy=True)
                box = [h]
                del h
                h = level(box, level_skips, emb_act)
                del level_skips  # consumed: free as soon as the level no longer needs them
            elif kind == "output":
                norm, conv = modules
                if recompute != "none":
                    h = prep_conv(norm, conv, [h], [norm.weight, norm.bias])
                else:
                    h = conv(norm(h))
            else:
                raise ValueError(f"unknown stage kind {kind!r}; expected one of {STAGE_KINDS}")
        return h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
