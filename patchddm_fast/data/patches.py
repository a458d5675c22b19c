"""The PatchDDM data path: patch offsets, decimation, padding.

PatchDDM trains on random patches of the padded volume and tells the network where each
patch lies with 3 coordinate channels (built with the rest of the conditioning in
:mod:`patchddm_fast.model.conditioning`).  At inference the full volume goes through the
same network in one pass.

Offsets follow the reference code's per-axis trapezoid U{0..32} + U{0..96} (for a 256
volume and 128 patch), which favours central patches: patch centres lie in [64, 192] and
the outermost ones are 33x rarer than the central ones.  :class:`PatchOffsetSampler`
generalises it to any volume/patch size; ``"uniform"`` is offered for comparison.

Tensor helpers work on torch tensors and numpy arrays alike, on the last 3 (spatial) axes.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = [
    "OFFSET_DISTRIBUTIONS",
    "PatchOffsetSampler",
    "as_triple",
    "decimate",
    "pad_to_multiple",
    "pad_to_shape",
    "trapezoid_split",
    "unpad",
]

Array = Union[torch.Tensor, np.ndarray]
PadSpec = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
OFFSET_DISTRIBUTIONS = ("trapezoid", "uniform")


def as_triple(value, name: str, minimum: int = 1) -> tuple[int, int, int]:
    """An int (repeated) or a sequence of 3 ints, each >= ``minimum``."""
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}") from None
    if len(out) != 3 or any(o != v for o, v in zip(out, value)) or any(o < minimum for o in out):
        raise ValueError(f"{name} must be an int or 3 ints, each >= {minimum}, got {value!r}")
    return out


def _spatial(x: Array, name: str) -> tuple[int, int, int]:
    if x.ndim < 3:
        raise ValueError(f"{name} must have at least 3 (spatial) dimensions, got shape {tuple(x.shape)}")
    return tuple(int(s) for s in x.shape[-3:])


def trapezoid_split(span: int) -> tuple[int, int]:
    """(a, b) with a + b = span, a = span // 4: offsets are U{0..a} + U{0..b}.

    For the paper's 256 volume and 128 patch (span 128) this is (32, 96).
    """
    if span < 0:
        raise ValueError(f"span must be >= 0, got {span}")
    a = span // 4
    return a, span - a


class PatchOffsetSampler:
    """Random patch offsets (one per axis) for ``patch_shape`` patches of a ``volume_shape`` volume.

    ``distribution="trapezoid"`` (the paper): offset = U{0..a} + U{0..b} with
    (a, b) = :func:`trapezoid_split` (V - P); ``"uniform"``: U{0..V-P}.  An axis where the
    patch fills the volume always gets offset 0.
    """

    def __init__(self, volume_shape, patch_shape, distribution: str = "trapezoid"):
        self.volume_shape = as_triple(volume_shape, "volume_shape")
        self.patch_shape = as_triple(patch_shape, "patch_shape")
        if distribution not in OFFSET_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {OFFSET_DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        for axis, (v, p) in enumerate(zip(self.volume_shape, self.patch_shape)):
            if p > v:
                raise ValueError(
                    f"patch_shape {self.patch_shape} exceeds volume_shape {self.volume_shape} on axis {axis} "
                    f"({p} > {v}); pad the volume or use a smaller patch"
                )
        self.spans = tuple(v - p for v, p in zip(self.volume_shape, self.patch_shape))

    def _parts(self, axis: int) -> tuple[int, ...]:
        """Upper bounds of the independent uniform summands along ``axis``."""
        span = self.spans[axis]
        return trapezoid_split(span) if self.distribution == "trapezoid" else (span,)

    def sample(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """One offset per axis; the patch is ``volume[o0:o0+P0, o1:o1+P1, o2:o2+P2]``."""
        return tuple(
            int(sum(rng.integers(0, hi + 1) for hi in self._parts(axis))) for axis in range(3)
        )

    def pmf(self, axis: int) -> np.ndarray:
        """Exact probability of each offset 0..V-P along ``axis`` (float64, sums to 1)."""
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        out = np.ones(1)
        for hi in self._parts(axis):
            out = np.convolve(out, np.full(hi + 1, 1.0 / (hi + 1)))
        return out

    def __repr__(self) -> str:
        return (
            f"PatchOffsetSampler(volume_shape={self.volume_shape}, patch_shape={self.patch_shape}, "
            f"distribution={self.distribution!r})"
        )


def decimate(tensor: Array, factor: int = 2) -> Array:
    """Stride-``factor`` decimation of the 3 spatial axes (HalfRes: ``x[..., ::2, ::2, ::2]``)."""
    _spatial(tensor, "tensor")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    f = int(factor)
    return tensor[..., ::f, ::f, ::f]


def _zeros_like_shape(x: Array, shape: tuple[int, ...]) -> Array:
    if isinstance(x, torch.Tensor):
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    return np.zeros(shape, dtype=x.dtype)


def pad_to_shape(tensor: Array, target_shape) -> tuple[Array, PadSpec]:
    """Zero-pad the spatial axes symmetrically to ``target_shape``; odd remainders go to the end.

    240x240x155 -> 256^3 gives ((8, 8), (8, 8), (50, 51)), as in the paper.  Returns the
    padded copy and the pad spec that :func:`unpad` inverts.
    """
    shape = _spatial(tensor, "tensor")
    target = as_triple(target_shape, "target_shape")
    if any(t < s for t, s in zip(target, shape)):
        raise ValueError(f"target_shape {target} is smaller than the spatial shape {shape}")
    spec = tuple(((t - s) // 2, (t - s) - (t - s) // 2) for s, t in zip(shape, target))
    out = _zeros_like_shape(tensor, tuple(tensor.shape[:-3]) + target)
    out[(..., *(slice(b, b + s) for (b, _), s in zip(spec, shape)))] = tensor
    return out, spec


def pad_to_multiple(tensor: Array, multiple) -> tuple[Array, PadSpec]:
    """Zero-pad each spatial axis symmetrically up to the next multiple of ``multiple``.

    A U-Net with L levels needs sizes divisible by 2**(L-1) (64 for the paper's 7 levels).
    """
    shape = _spatial(tensor, "tensor")
    mult = as_triple(multiple, "multiple")
    target = tuple(-(-s // m) * m for s, m in zip(shape, mult))
    return pad_to_shape(tensor, target)


def unpad(tensor: Array, pad_spec: PadSpec) -> Array:
    """Crop away the padding described by ``pad_spec`` (inverse of :func:`pad_to_shape`)."""
    shape = _spatial(tensor, "tensor")
    if len(pad_spec) != 3:
        raise ValueError(f"pad_spec must hold 3 (before, after) pairs, got {pad_spec!r}")
    slices = []
    for axis, ((before, after), n) in enumerate(zip(pad_spec, shape)):
        if before < 0 or after < 0 or before + after > n:
            raise ValueError(f"pad_spec {pad_spec} does not fit spatial shape {shape} (axis {axis})")
        slices.append(slice(before, n - after))
    return tensor[(..., *slices)]
