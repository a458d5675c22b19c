"""The training methods as data: one :class:`Method` per PatchDDM, HalfRes, FullRes and the
"patches" ablation -- the one home of everything that differs between them.

PAPER.md compares three ways to fit a 3D diffusion segmenter into memory:

* **PatchDDM** trains on random patches and appends 3 coordinate channels that tell the
  network where the patch lies; it samples the whole volume in one pass.
* **HalfRes** decimates image and label by 2 (the input volume must then be a multiple of
  twice the network's multiple), trains and samples on the whole decimated volume, and
  upsamples the prediction.
* **FullRes** trains and samples on the whole volume.
* **patches** (our ablation) trains on PatchDDM's patches without the coordinate channels,
  which shows what the position encoding buys.

One word for one concept: ``UNet3D.from_method`` builds the network of a method, and the
memory tools take the same names (``simulate(method=...)``, ``patchddm memory --method``).  How the
conditioning tensors are built from these fields is :mod:`patchddm_fast.model.conditioning`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

from patchddm_fast.data.layouts import MODALITIES
from patchddm_fast.data.regions import target_channels

IMAGE_CHANNELS = len(MODALITIES)  # t1, t1ce, t2, flair
COORDINATE_CHANNELS = 3  # one linear ramp per spatial axis (PatchDDM)


def network_multiple(channel_mult: Sequence[int]) -> int:
    """Spatial sizes the U-Net accepts are multiples of this: one halving per level below the top."""
    return 2 ** (len(channel_mult) - 1)


@dataclass(frozen=True)
class Method:
    """What one method feeds the network and how it sees the volume."""

    name: str
    coordinates: bool  # conditioning gets the 3 coordinate channels (PatchDDM)
    decimation: int  # image and label are decimated by this stride (HalfRes: 2)
    patches: bool  # trained on random patches, not whole volumes

    def __post_init__(self) -> None:
        if self.decimation < 1:
            raise ValueError(f"{self.name}: decimation must be >= 1, got {self.decimation}")
        if self.coordinates and self.decimation > 1:  # the ramps would have to be decimated too
            raise ValueError(f"{self.name}: coordinate channels on a decimated volume are not implemented")

    def in_channels(self, target: str = "binary", image_channels: int = IMAGE_CHANNELS) -> int:
        """Network input channels: image (+ 3 coordinates) + the noisy mask of ``target``
        (1 channel for the whole tumour, 3 for the WT/TC/ET regions)."""
        return image_channels + (COORDINATE_CHANNELS if self.coordinates else 0) + target_channels(target)

    def network_channels(self, target: str = "binary", image_channels: int = IMAGE_CHANNELS) -> Dict[str, int]:
        """The ``UNet3D`` arguments this method and ``target`` fix: ``in_channels`` and
        ``out_channels`` (the predicted mask channels)."""
        return dict(in_channels=self.in_channels(target, image_channels), out_channels=target_channels(target))

    def size_multiple(self, network_multiple: int) -> int:
        """What input volumes are padded to: the network's multiple (``UNet3D.size_multiple``,
        :func:`network_multiple`), times the decimation, so the decimated volume still fits."""
        return int(network_multiple) * self.decimation


PATCHDDM = Method("patchddm", coordinates=True, decimation=1, patches=True)
HALFRES = Method("halfres", coordinates=False, decimation=2, patches=False)
FULLRES = Method("fullres", coordinates=False, decimation=1, patches=False)
PATCHES = Method("patches", coordinates=False, decimation=1, patches=True)

_BY_NAME: Dict[str, Method] = {m.name: m for m in (PATCHDDM, HALFRES, FULLRES, PATCHES)}
METHODS: Tuple[str, ...] = tuple(_BY_NAME)  # the names, for choices and validation


def get_method(method: Union[str, Method]) -> Method:
    """The :class:`Method` of a name (configs and checkpoints store names); a Method passes through."""
    if isinstance(method, Method):
        return method
    if method not in _BY_NAME:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _BY_NAME[method]
