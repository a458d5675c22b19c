"""What the network is conditioned on -- one place that builds the channel layout.

PAPER.md: MR channels are scaled to [0, 1] and mapped x -> 2x - 1; PatchDDM appends three
coordinate channels (ramps over the whole padded volume, cropped with the patch); the
noisy mask is always the last channel.  Which method does what (coordinates, decimation,
patches) is data in :mod:`patchddm_fast.model.method`; this module turns it into tensors.
Training (patches) and sampling (whole volumes) both build their inputs here, so they
cannot drift apart.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from patchddm_fast.data.patches import decimate
from patchddm_fast.data.regions import check_target, region_masks
from patchddm_fast.model.method import Method, get_method


def scale_image(image01: torch.Tensor) -> torch.Tensor:
    """[0, 1] intensities -> [-1, 1], as the reference code expects."""
    return image01 * 2 - 1


def coordinate_ramps(volume_shape: Sequence[int], origin: Sequence[int], window: Sequence[int]) -> torch.Tensor:
    """(3, *window) float32: channel k is ``torch.linspace(-1, 1, volume_shape[k])`` along axis k,
    cropped to the window at ``origin`` -- the sub-ramp a patch at that position sees."""
    ramps = [torch.linspace(-1, 1, n, dtype=torch.float32)[o:o + w] for n, o, w in zip(volume_shape, origin, window)]
    return torch.stack(torch.meshgrid(*ramps, indexing="ij"))


def condition(image01: torch.Tensor, method: Union[str, Method], volume_shape=None, origin=(0, 0, 0)) -> torch.Tensor:
    """Conditioning channels for a window (C, d, h, w) of a padded volume -> (C', d', h', w').

    ``volume_shape``/``origin`` place the window in the whole padded volume (default: the
    window *is* the whole volume).  PatchDDM appends the coordinate channels of the whole
    volume cropped to the window; HalfRes decimates the window by its factor.
    """
    m = get_method(method)
    img = scale_image(image01.float())
    if m.decimation > 1:
        img = decimate(img, m.decimation)
    if m.coordinates:
        window = tuple(img.shape[-3:])
        volume_shape = tuple(volume_shape) if volume_shape is not None else window
        coords = coordinate_ramps(volume_shape, origin, window).to(img.dtype).to(img.device)
        img = torch.cat([img, coords], dim=0)
    return img


def target_mask(label: torch.Tensor, method: Union[str, Method], target: str = "binary",
                convention: str = "brats2020") -> torch.Tensor:
    """The diffusion target x0 for a label volume (D, H, W), values {0, 1}: (1, D', H', W')
    whole tumour (label > 0), or (3, D', H', W') WT/TC/ET of the label ``convention``."""
    m = get_method(method)
    if check_target(target) == "regions":
        mask = region_masks(label, convention).float()
    else:
        mask = (label > 0).float()[None]
    return decimate(mask, m.decimation) if m.decimation > 1 else mask


def network_input(cond: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Concatenate conditioning (N, C, ...) and the noisy mask (N, 1 or 3, ...): mask last."""
    return torch.cat([cond.to(x_t.dtype), x_t], dim=1)
