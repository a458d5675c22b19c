"""Training cases in memory and the per-step batch sampler.

A :class:`VolumeCase` is one subject padded to the network's size multiple.  The
:class:`BatchSampler` turns (step index) into a batch deterministically: every random
choice of step k comes from a generator seeded with (seed, k).  That makes an
interrupted run resume *exactly* -- there is no RNG state to save or restore.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from patchddm_fast.conditioning import check_method, condition, target_mask
from patchddm_fast.data.patches import PatchOffsetSampler, crop, pad_to_multiple


@dataclass
class VolumeCase:
    case_id: str
    image: torch.Tensor  # (4, D, H, W) float32 in [0, 1], padded
    label: torch.Tensor  # (D, H, W) bool, padded


def pad_case(case_id: str, image, label, multiple: int) -> VolumeCase:
    image = torch.as_tensor(np.asarray(image, dtype=np.float32))
    label = torch.as_tensor(np.asarray(label)).bool()
    image, _ = pad_to_multiple(image, multiple)
    label, _ = pad_to_multiple(label[None].float(), multiple)
    return VolumeCase(case_id, image, label[0] > 0.5)


def step_generators(seed: int, step: int) -> Tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch generators for one training step (counter-based seeding)."""
    rng = np.random.default_rng([seed, step])
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, gen


class BatchSampler:
    """Conditioning and target batches for one method (PatchDDM patches, HalfRes, FullRes)."""

    def __init__(self, cases: Sequence[VolumeCase], method: str, patch_size: int = 128, distribution: str = "trapezoid"):
        if not cases:
            raise ValueError("no training cases")
        self.method = check_method(method)
        self.cases = list(cases)
        # Conditioning of every whole volume is computed once (coordinates of the whole padded volume).
        self.conds = [condition(c.image, method) for c in self.cases]
        self.targets = [target_mask(c.label, method) for c in self.cases]
        self.patch = None
        if method == "patchddm":
            shapes = {tuple(c.image.shape[-3:]) for c in self.cases}
            self.offsets = {s: PatchOffsetSampler(s, (patch_size,) * 3, distribution=distribution) for s in shapes}
            self.patch = (patch_size,) * 3
        else:
            shapes = {tuple(t.shape[-3:]) for t in self.targets}
            if len(shapes) > 1:
                raise ValueError(f"{method} trains on whole volumes, which must share one shape; got {sorted(shapes)}")

    def batch(self, rng: np.random.Generator, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        conds: List[torch.Tensor] = []
        targets: List[torch.Tensor] = []
        for _ in range(batch_size):
            i = int(rng.integers(len(self.cases)))
            cond, target = self.conds[i], self.targets[i]
            if self.patch is not None:
                offset = self.offsets[tuple(cond.shape[-3:])].sample(rng)
                cond, target = crop(cond, offset, self.patch), crop(target, offset, self.patch)
            conds.append(cond)
            targets.append(target)
        return torch.stack(conds), torch.stack(targets)
