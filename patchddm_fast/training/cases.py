"""Training cases and the per-step batch sampler.

A case is anything with ``case_id``, ``shape`` (its padded grid) and
``read(origin, size) -> (image (4, *size) float32 in [0, 1], label (*size))``: an in-memory
:class:`VolumeCase` (phantoms) or a memory-mapped cached volume from
:mod:`patchddm_fast.data.cache` (real datasets, which never fit in memory whole).  The
:class:`BatchSampler` reads only the window it needs each step.

Every random choice of sample i of step k comes from generators seeded with (seed, k, i)
(plain (seed, k) for i = 0), so an interrupted run resumes *exactly* -- there is no RNG
state to save or restore -- and data-parallel ranks draw their shares of a global batch
independently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from patchddm_fast.model.conditioning import condition, target_mask
from patchddm_fast.model.method import get_method
from patchddm_fast.data.nifti import shifted_affine
from patchddm_fast.data.patches import PatchOffsetSampler, pad_to_multiple


class CaseSource(Protocol):
    case_id: str

    @property
    def shape(self) -> Tuple[int, int, int]: ...

    @property
    def affine(self) -> np.ndarray: ...  # the padded grid's voxel -> world matrix (4, 4)

    def read(self, origin: Sequence[int] = (0, 0, 0), size: Optional[Sequence[int]] = None): ...


@dataclass
class VolumeCase:
    """An in-memory padded case (phantoms, tests)."""

    case_id: str
    image: torch.Tensor  # (4, D, H, W) float32 in [0, 1], padded
    label: torch.Tensor  # (D, H, W) uint8 label values (0/1, or BraTS classes), padded
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))  # the padded grid's voxel -> world

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.image.shape[-3:])

    def read(self, origin: Sequence[int] = (0, 0, 0), size: Optional[Sequence[int]] = None):
        size = self.shape if size is None else tuple(size)
        window = tuple(slice(o, o + s) for o, s in zip(origin, size))
        return self.image[(slice(None),) + window], self.label[window]


def pad_case(case_id: str, image, label, multiple: int, affine: Optional[np.ndarray] = None) -> VolumeCase:
    """A padded in-memory case; the label keeps its values (bool labels become 0/1); ``affine``
    (default identity) is the unpadded grid's and is moved with the padding."""
    image = torch.as_tensor(np.asarray(image, dtype=np.float32))
    label = torch.as_tensor(np.asarray(label).astype(np.uint8))
    image, spec = pad_to_multiple(image, multiple)
    label, _ = pad_to_multiple(label[None].float(), multiple)
    affine = shifted_affine(np.eye(4) if affine is None else affine, [before for before, _ in spec])
    return VolumeCase(case_id, image, label[0].round().to(torch.uint8), affine)


def read_whole(case: CaseSource, binary: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image float32 (4, D, H, W), label (D, H, W)) of a whole padded case: the label as
    whole-tumour bool (``binary``) or as its uint8 values (for region targets)."""
    image, label = case.read()
    label = torch.as_tensor(np.asarray(label))
    return torch.as_tensor(np.asarray(image, dtype=np.float32)), (label > 0 if binary else label.to(torch.uint8))


def step_generators(seed: int, step: int, index: int = 0) -> Tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch generators for sample ``index`` of one training step.

    Counter-based: keyed by (seed, step, global sample index) only, so any rank of a
    data-parallel run can draw any sample of the global batch without the others, and
    N ranks x batch B see the same samples as 1 rank x batch N*B.  Index 0 uses the key
    (seed, step) of the single-sample runs that came before data parallelism, so batch-1
    training draws exactly what it always drew.
    """
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, step] if index == 0 else [seed, step, index])
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, gen


class BatchSampler:
    """Conditioning and target batches for one method (PatchDDM patches, HalfRes, FullRes)."""

    def __init__(self, cases: Sequence[CaseSource], method: str, patch_size: int = 128, distribution: str = "trapezoid",
                 target: str = "binary", convention: str = "brats2020"):
        if not cases:
            raise ValueError("no training cases")
        self.method = get_method(method)
        self.target, self.convention = target, convention
        self.cases = list(cases)
        shapes = {tuple(c.shape) for c in self.cases}
        self.patch: Optional[Tuple[int, int, int]] = None
        if self.method.patches:
            self.patch = (patch_size,) * 3
            self.offsets = {s: PatchOffsetSampler(s, self.patch, distribution=distribution) for s in shapes}
        elif len(shapes) > 1:
            raise ValueError(f"{method} trains on whole volumes, which must share one shape; got {sorted(shapes)}")

    def batch(self, rng: np.random.Generator, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        conds: List[torch.Tensor] = []
        targets: List[torch.Tensor] = []
        for _ in range(batch_size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            origin = (0, 0, 0) if self.patch is None else tuple(self.offsets[tuple(case.shape)].sample(rng))
            image, label = case.read(origin, self.patch)
            image = torch.as_tensor(np.asarray(image, dtype=np.float32))
            label = torch.as_tensor(np.asarray(label))
            conds.append(condition(image, self.method, case.shape, origin))
            targets.append(target_mask(label, self.method, self.target, self.convention))
        return torch.stack(conds), torch.stack(targets)
