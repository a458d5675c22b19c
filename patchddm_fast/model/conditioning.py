"""What the network is conditioned on, per method -- one place for the channel layout.

PAPER.md: MR channels are scaled to [0, 1] and mapped x -> 2x - 1; PatchDDM appends three
coordinate channels (ramps over the whole padded volume, cropped with the patch); the
noisy mask is always the last channel.  HalfRes decimates image and label by 2; FullRes
uses the whole volume; "patches" trains on patches like PatchDDM but without the
coordinate channels (the ablation that shows what the position encoding buys).  Training (patches) and sampling (whole volumes) both build their
inputs here, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from patchddm_fast.data.patches import decimate
from patchddm_fast.data.regions import check_target, region_masks

METHODS = ("patchddm", "halfres", "fullres", "patches")
# Methods trained on random patches of the volume: PatchDDM, and "patches" -- the same
# without coordinate channels, the paper's ablation of the position encoding.
PATCH_METHODS = ("patchddm", "patches")
IMAGE_CHANNELS = 4


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def in_channels(method: str, image_channels: int = IMAGE_CHANNELS, mask_channels: int = 1) -> int:
    """Network input channels: image (+ 3 coordinates for PatchDDM) + the noisy mask
    (1 channel for the whole tumour, 3 for the WT/TC/ET regions)."""
    return image_channels + (3 if check_method(method) == "patchddm" else 0) + mask_channels


def scale_image(image01: torch.Tensor) -> torch.Tensor:
    """[0, 1] intensities -> [-1, 1], as the reference code expects."""
    return image01 * 2 - 1


def condition(image01: torch.Tensor, method: str, volume_shape=None, origin=(0, 0, 0)) -> torch.Tensor:
    """Conditioning channels for a window (C, d, h, w) of a padded volume -> (C', d', h', w').

    ``volume_shape``/``origin`` place the window in the whole padded volume (default: the
    window *is* the whole volume).  PatchDDM appends the coordinate channels of the whole
    volume cropped to the window; HalfRes decimates the window by 2.
    """
    check_method(method)
    img = scale_image(image01.float())
    if method == "halfres":
        return decimate(img)
    if method == "patchddm":
        window = tuple(img.shape[-3:])
        volume_shape = tuple(volume_shape) if volume_shape is not None else window
        ramps = [torch.linspace(-1, 1, n, dtype=torch.float32)[o:o + w] for n, o, w in zip(volume_shape, origin, window)]
        coords = torch.stack(torch.meshgrid(*ramps, indexing="ij")).to(img.dtype).to(img.device)
        return torch.cat([img, coords], dim=0)
    return img


def target_mask(label: torch.Tensor, method: str, target: str = "binary", convention: str = "brats2020") -> torch.Tensor:
    """The diffusion target x0 for a label volume (D, H, W), values {0, 1}: (1, D', H', W')
    whole tumour (label > 0), or (3, D', H', W') WT/TC/ET of the label ``convention``."""
    if check_target(target) == "regions":
        m = region_masks(label, convention).float()
    else:
        m = (label > 0).float()[None]
    return decimate(m) if check_method(method) == "halfres" else m


def network_input(cond: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Concatenate conditioning (N, C, ...) and the noisy mask (N, 1 or 3, ...): mask last."""
    return torch.cat([cond.to(x_t.dtype), x_t], dim=1)
