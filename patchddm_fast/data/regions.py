"""BraTS label conventions and the nested tumour regions: the one home for both.

BraTS ground truths come in two label conventions, and a third, binary one covers the
paper's whole-tumour setting:

=============  ================  ==========================================
convention     label values      regions (label values counted)
=============  ================  ==========================================
``binary``     0, 1              WT = 1
``brats2020``  0, 1, 2, 4        WT = 1, 2, 4;  TC = 1, 4;  ET = 4
``brats2023``  0, 1, 2, 3        WT = 1, 2, 3;  TC = 1, 3;  ET = 3
=============  ================  ==========================================

(1 necrotic / non-enhancing core, 2 edema, 4 or 3 enhancing tumour.)  Region training
(``--target regions``) diffuses WT/TC/ET as three overlapping binary channels, the way
nnU-Net trains BraTS "region-based"; :func:`label_map` turns the three channels back into
one label map of the training data's convention.

Conflicts between channels resolve **outside in**: the regions are nested (ET ⊂ TC ⊂ WT),
so a voxel is TC only if it is also WT, and ET only if it is also TC
(:func:`nest_regions`).  A voxel whose TC channel says yes but whose WT channel says no
is background; this never enlarges the whole tumour, the region scored most reliably.

A segmentation is made from an ensemble mean in one place, :func:`tumour_mask`: threshold,
nest, and fill the holes the whole tumour and the tumour core enclose (see there why).
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

CONVENTIONS = ("binary", "brats2020", "brats2023")
REGION_NAMES = ("WT", "TC", "ET")
TARGETS = ("binary", "regions")

LABEL_VALUES: Dict[str, Tuple[int, ...]] = {
    "binary": (0, 1), "brats2020": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3),
}
BRATS_REGIONS: Dict[str, Tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
BRATS2023_REGIONS: Dict[str, Tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGIONS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "binary": {"WT": (1,)}, "brats2020": BRATS_REGIONS, "brats2023": BRATS2023_REGIONS,
}
# The label each nested region writes in a label map, innermost last (see label_map).
_REGION_LABEL = {"brats2020": (2, 1, 4), "brats2023": (2, 1, 3)}

Array = Union[np.ndarray, torch.Tensor]


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"label convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target


def target_channels(target: str) -> int:
    """Channels of the diffused mask: 1 for the paper's whole tumour, 3 for WT/TC/ET."""
    return 3 if check_target(target) == "regions" else 1


def detect_convention(values: Iterable[int], source: str = "the labels") -> str:
    """The convention of a set of label values seen in ground truth.

    Values {0, 1} are binary; a 4 means BraTS 2020 (enhancing = 4), a 3 BraTS 2023.  Sets
    with neither (e.g. {0, 1, 2}) are ambiguous but score identically under both, so they
    read as 2020.  Anything else is an error naming ``source``.
    """
    present = {int(v) for v in values}
    unknown = present - {0, 1, 2, 3, 4}
    if unknown:
        raise ValueError(f"{source}: label values {sorted(unknown)} belong to no known convention "
                         f"(binary 0/1, BraTS 2020 0/1/2/4, BraTS 2023 0/1/2/3)")
    if 3 in present and 4 in present:
        raise ValueError(f"{source}: labels contain both 3 and 4, which mixes the BraTS 2023 (ET = 3) and "
                         f"2020 (ET = 4) conventions")
    if present <= {0, 1}:
        return "binary"
    return "brats2023" if 3 in present else "brats2020"


def region_masks(labels: Array, convention: str) -> Array:
    """(3, *shape) boolean WT/TC/ET of a label map (numpy or torch, same kind back).

    Under ``binary`` every channel is ``labels > 0`` (whole tumour only; no core is known).
    """
    regions = REGIONS[check_convention(convention)]
    if isinstance(labels, torch.Tensor):
        if convention == "binary":
            return (labels > 0).unsqueeze(0).expand(3, *labels.shape).clone()
        return torch.stack([torch.isin(labels, torch.tensor(regions[r], device=labels.device)) for r in REGION_NAMES])
    labels = np.asarray(labels)
    if convention == "binary":
        return np.broadcast_to(labels > 0, (3, *labels.shape)).copy()
    return np.stack([np.isin(labels, regions[r]) for r in REGION_NAMES])


def nest_regions(channels: Array) -> Array:
    """Enforce ET ⊂ TC ⊂ WT on (3, ...) masks or probabilities: TC = min(TC, WT), ET = min(ET, TC)."""
    if isinstance(channels, torch.Tensor):
        wt = channels[0]
        tc = torch.minimum(channels[1], wt)
        return torch.stack([wt, tc, torch.minimum(channels[2], tc)])
    channels = np.asarray(channels)
    wt = channels[0]
    tc = np.minimum(channels[1], wt)
    return np.stack([wt, tc, np.minimum(channels[2], tc)])


def label_map(masks: np.ndarray, convention: str) -> np.ndarray:
    """One uint8 label map from (3, *shape) WT/TC/ET masks, hierarchy enforced (outside in).

    WT-only voxels become edema (2), TC-not-ET voxels necrotic core (1), ET voxels 4 (2020)
    or 3 (2023).  Under ``binary`` the map is WT as 0/1.
    """
    masks = nest_regions(np.asarray(masks).astype(bool))
    if check_convention(convention) == "binary":
        return masks[0].astype(np.uint8)
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for mask, value in zip(masks, _REGION_LABEL[convention]):
        out[mask] = value
    return out


def fill_enclosed_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every predicted-empty voxel it encloses in 3D set (scipy's binary_fill_holes:
    background components that do not reach the volume's border)."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def tumour_mask(mean: Array, threshold: float = 0.5, fill_holes: bool = True) -> Array:
    """The segmentation of an ensemble mean (numpy or torch, the same kind and device back).

    ``mean > threshold``; a region model's (3, ...) channels nested ET ⊂ TC ⊂ WT
    (:func:`nest_regions`).  With ``fill_holes`` (the default of every command), voxels
    enclosed in 3D by the whole tumour, and by the tumour core, are filled: both regions
    contain the necrotic core by definition, so an enclosed gap in them is tumour the
    network missed, never anatomy.  Why it is needed (issue 13, BENCHMARKS §1): a liquefied
    necrotic core looks like CSF in all four channels, and a network that has seen few such
    cores gives its interior a lower probability than the enhancing rim around it, which
    leaves a ring.  The enhancing tumour is not filled: it is a rim around the core.
    """
    is_torch = isinstance(mean, torch.Tensor)
    device = mean.device if is_torch else None
    values = mean.detach().cpu().numpy() if is_torch else np.asarray(mean)
    mask = values > threshold
    if mask.ndim == 4:
        mask = nest_regions(mask)
        if fill_holes:  # WT and TC; filling is monotone, so TC ⊂ WT still holds
            mask = np.stack([fill_enclosed_holes(mask[0]), fill_enclosed_holes(mask[1]), mask[2]])
    elif fill_holes:
        mask = fill_enclosed_holes(mask)
    return torch.from_numpy(np.ascontiguousarray(mask)).to(device) if is_torch else mask
