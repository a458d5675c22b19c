"""A torch Dataset over cached volumes: whole padded volumes or random training patches.

Items are ``(image, label, origin)``:

* ``image`` -- float32 (C, *S) in [0, 1] (network-grid window; S = patch or whole volume),
* ``label`` -- float32 (K, *S): one {0, 1} channel per region (``regions=None`` -> one
  channel, label > 0, i.e. whole tumour; e.g. ``BRATS_REGIONS.values()`` -> WT, TC, ET),
* ``origin`` -- int64 (3,), the window's position on the padded grid (what PatchDDM's
  coordinate channels are cropped with).

Patch origins come from the trainer's :class:`patchddm_fast.data.patches.PatchOffsetSampler`
(the paper's trapezoid by default), so training from the cache and from memory draw
identically.  Randomness uses torch's global generator, which DataLoader seeds per worker.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from patchddm_fast.data.cache import CachedVolume
from patchddm_fast.data.patches import PatchOffsetSampler


def _region_channels(label: np.ndarray, regions: Optional[Sequence[Sequence[int]]]) -> np.ndarray:
    if regions is None:
        return (label > 0)[None].astype(np.float32)
    return np.stack([np.isin(label, list(r)) for r in regions]).astype(np.float32)


class CachedVolumeDataset(torch.utils.data.Dataset):
    """Reads cached volumes (memory-mapped) as whole volumes or ``patch_size`` patches."""

    def __init__(self, volumes: Sequence[CachedVolume], *, patch_size: Union[int, Sequence[int], None] = None,
                 distribution: str = "trapezoid", regions: Optional[Sequence[Sequence[int]]] = None):
        if not volumes:
            raise ValueError("CachedVolumeDataset needs at least one cached volume")
        unlabelled = [v.case_id for v in volumes if v.label is None]
        if unlabelled:
            raise ValueError(f"cases without labels cannot be used for training: {unlabelled[:5]}")
        self.volumes = list(volumes)
        self.regions = [tuple(r) for r in regions] if regions is not None else None
        self.patch: Optional[Tuple[int, int, int]] = None
        self._samplers: Dict[Tuple[int, ...], PatchOffsetSampler] = {}
        if patch_size is not None:
            p = (int(patch_size),) * 3 if np.isscalar(patch_size) else tuple(int(s) for s in patch_size)
            self.patch = p  # type: ignore[assignment]
            for v in self.volumes:
                if v.shape not in self._samplers:
                    self._samplers[v.shape] = PatchOffsetSampler(v.shape, p, distribution=distribution)

    def __len__(self) -> int:
        return len(self.volumes)

    def sample(self, index: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The item for volume ``index`` with the patch origin drawn from ``rng``."""
        vol = self.volumes[index]
        if self.patch is None:
            origin, size = (0, 0, 0), vol.shape
        else:
            origin, size = tuple(int(o) for o in self._samplers[vol.shape].sample(rng)), self.patch
        image, label = vol.read(origin, size)
        return (torch.from_numpy(image), torch.from_numpy(_region_channels(label, self.regions)),
                torch.tensor(origin, dtype=torch.int64))

    def __getitem__(self, index: int):
        seed = int(torch.randint(0, 2**62, ()).item())
        return self.sample(index, np.random.default_rng(seed))


def measure_throughput(dataset: torch.utils.data.Dataset, n_items: int = 50, *, num_workers: int = 0,
                       batch_size: int = 1, warmup: int = 2) -> Dict[str, float]:
    """Items per second (and MB/s of image data) through a DataLoader with random sampling."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers,
        sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=(n_items + warmup) * batch_size),
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    nbytes, start = 0, time.perf_counter()
    for _ in range(n_items):
        image = next(it)[0]
        nbytes += image.numel() * image.element_size()
    elapsed = time.perf_counter() - start
    return {"items_per_s": n_items * batch_size / elapsed, "mb_per_s": nbytes / elapsed / 1e6,
            "seconds": elapsed, "items": float(n_items * batch_size)}
