"""Deterministic BraTS-like synthetic cases, for tests, demos and smoke training.

Real brain data cannot be downloaded here, so the pipeline is exercised on phantoms that
share what matters with BraTS: 4 co-registered channels (t1, t1ce, t2, flair) in [0, 1]
with exact zeros outside the head, a nested multi-class tumour (necrotic core 1, edema 2,
enhancing rim 4, BraTS label values) and realistic nuisances (tissue texture, bias field,
partial-volume blur, Rician noise).

The phantom is built to punish shortcuts a diffusion segmenter could take:

* every tumour compartment has a different contrast per channel (edema bright on
  flair/t2 and dark on t1; enhancing rim bright only on t1ce; necrosis dark on t1/t1ce),
  so dropping a channel loses information;
* a **decoy** -- a symmetric pair of periventricular "caps" at the front tips of the
  ventricles -- has the tumour edema's intensities in all four channels but is NOT
  tumour.  It differs from edema only by its anatomical position (and by lacking an
  enhancing core), so a per-voxel intensity model cannot tell them apart and marks it
  (tested); a model that knows where it is (PatchDDM's coordinate channels) can learn the
  site.

All geometry is defined in normalised coordinates ((-1, 1) along every axis), so one seed
gives the same anatomy at any size, including non-cubic ones (the head is stretched with
the array).  Axis 0 is the left-right axis: the ventricles and decoys are mirror pairs
across its mid-plane.  Every random draw comes from ``np.random.default_rng(seed)``;
scalar parameters and coarse noise grids are drawn before any per-voxel noise, so only
the voxel noise depends on the size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patchddm_fast.data.layouts import MODALITIES
from patchddm_fast.data.patches import as_triple

__all__ = ["LARGE_NECROSIS", "NECROSIS_LOOKS", "PhantomCase", "case_seed", "make_phantom", "make_phantom_dataset"]

# Mean intensity per tissue and channel (in MODALITIES order: t1, t1ce, t2, flair), before per-case jitter,
# bias field and noise.  Loosely follows the relative contrasts of BraTS scans.
_TISSUE = {
    "scalp": (0.85, 0.55, 0.55, 0.60),
    "bone": (0.08, 0.08, 0.06, 0.06),
    "csf": (0.12, 0.14, 0.95, 0.08),
    "gm": (0.50, 0.46, 0.62, 0.58),
    "wm": (0.72, 0.62, 0.42, 0.45),
    "edema": (0.45, 0.44, 0.85, 0.88),
    "enhancing": (0.45, 1.00, 0.75, 0.70),
    "necrosis": (0.20, 0.22, 0.92, 0.45),
}

# Tumour compartments are nested level sets of one noisy radius rho_t (1 at the edema's
# outer edge): the core (enhancing rim + necrosis) is rho_t <= core, the necrosis
# rho_t <= core * necrosis, with core and necrosis drawn uniformly from these ranges.
# The defaults give necrosis of 0-10 % of the whole tumour.
DEFAULT_CORE = (0.45, 0.7)
DEFAULT_NECROSIS = (0.35, 0.7)
# A large necrotic core (about a fifth to a third of the whole tumour, a thin enhancing
# rim), as in many glioblastomas: the interior of such a core is far from any edema or
# rim, looks like CSF on t1/t2, and is where a segmenter that has rarely seen one leaves
# a hole in the whole tumour.
LARGE_NECROSIS = dict(core=(0.75, 0.85), necrosis=(0.75, 0.85))
# How the necrotic core looks.  "default": the _TISSUE row above (dark on t1/t1ce, bright
# on t2, mid-grey on FLAIR).  "csf": the case's CSF intensities in all four channels,
# FLAIR-dark included -- liquefied necrosis as it often looks in glioblastoma, where only
# context (an enclosing enhancing rim, away from the ventricles) says it is tumour.
NECROSIS_LOOKS = ("default", "csf")

# Ellipsoidal radius (in head units, the head surface is 1) of each layer boundary.
_SCALP_INNER, _BONE_INNER, _BRAIN_OUTER = 0.93, 0.86, 0.82


@dataclass
class PhantomCase:
    """One synthetic case.

    Attributes:
        image: float32 (4, D, H, W) in [0, 1], channels :data:`~patchddm_fast.data.layouts.MODALITIES`; exactly 0 outside the head.
        label: bool (D, H, W) whole tumour (labels > 0).
        labels: uint8 (D, H, W) BraTS classes: 0 background, 1 necrotic core, 2 edema, 4 enhancing.
        brain_mask: bool (D, H, W) brain parenchyma (the tumour lies inside it).
        head_mask: bool (D, H, W) everything inside the scalp (where the image may be non-zero).
        decoy_mask: bool (D, H, W) tumour-mimicking non-tumour voxels (never overlaps ``label``;
            may be empty in volumes below ~16 voxels per axis, where the decoys are sub-voxel).
        case_id, seed: identification; ``make_phantom(shape, seed)`` rebuilds the case.
        spacing: voxel size in mm (isotropic 1 mm, like BraTS).
    """

    image: np.ndarray
    label: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    decoy_mask: np.ndarray
    case_id: str
    seed: int
    spacing: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.label.shape)

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> world (mm) matrix: axis-aligned, ``spacing`` per axis, voxel 0 at the origin."""
        return np.diag([*self.spacing, 1.0])

    @property
    def whole_tumour(self) -> np.ndarray:
        """BraTS WT region: labels 1, 2, 4."""
        return self.labels > 0

    @property
    def tumour_core(self) -> np.ndarray:
        """BraTS TC region: labels 1 and 4."""
        return (self.labels == 1) | (self.labels == 4)

    @property
    def enhancing_tumour(self) -> np.ndarray:
        """BraTS ET region: label 4."""
        return self.labels == 4


def _axes(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Normalised voxel-centre coordinates in (-1, 1), shaped to broadcast along each axis."""
    out = []
    for axis, n in enumerate(shape):
        u = ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1
        view = [1, 1, 1]
        view[axis] = n
        out.append(u.reshape(view))
    return out


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear interpolation of a coarse grid spanning the volume to ``shape``."""
    out = coarse.astype(np.float32)
    for axis, n in enumerate(shape):
        c = out.shape[axis]
        pos = ((np.arange(n, dtype=np.float32) + 0.5) / n) * (c - 1)
        i0 = np.minimum(pos.astype(np.int64), c - 2)
        w = (pos - i0).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = n
        w = w.reshape(view)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out


def _ellipsoid_radius(h: list[np.ndarray], centre, radii) -> np.ndarray:
    """sqrt(sum(((h_k - c_k) / r_k)^2)): 1 on the ellipsoid surface."""
    return np.sqrt(sum(((hk - ck) / rk) ** 2 for hk, ck, rk in zip(h, centre, radii)))


def _blur121(x: np.ndarray) -> np.ndarray:
    """Partial-volume blur: [1, 2, 1] / 4 along each of the last 3 axes (edges replicated)."""
    for axis in range(x.ndim - 3, x.ndim):
        src = np.moveaxis(x, axis, 0)
        out = 0.5 * src
        out[1:] += 0.25 * src[:-1]
        out[:-1] += 0.25 * src[1:]
        out[0] += 0.25 * src[0]
        out[-1] += 0.25 * src[-1]
        x = np.moveaxis(out, 0, axis)
    return x


def _check_range(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of fractions, got {value!r}") from None
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"{name} must satisfy 0 < low <= high < 1, got {value!r}")
    return lo, hi


def make_phantom(size: int | tuple[int, int, int], seed: int, case_id: str | None = None, *,
                 core: tuple[float, float] = DEFAULT_CORE,
                 necrosis: tuple[float, float] = DEFAULT_NECROSIS, lesions: int = 1,
                 necrosis_look: str = "default") -> PhantomCase:
    """Build one BraTS-like case of ``size`` (an int for a cube, or (D, H, W)) from ``seed``.

    ``core`` and ``necrosis`` are the ranges of the tumour core's radius (a fraction of the
    whole tumour's) and of the necrosis' radius (a fraction of the core's); pass
    ``**LARGE_NECROSIS`` for cases with a large necrotic core.  The ranges change only
    those two draws: the same seed gives the same head, decoys and tumour outline.

    ``lesions`` > 1 adds smaller, separate (multifocal) tumours, each with its own edema,
    enhancing rim and necrotic core, placed so that no two touch even after the BraTS 2023
    lesion-wise matching's 3-voxel dilation at 64^3: they exercise the lesion-wise metrics.
    Their parameters come from a separate random stream, so ``lesions=1`` is unchanged.

    ``necrosis_look`` (:data:`NECROSIS_LOOKS`) sets the necrotic core's intensities; it
    changes no random draw, so only the core's voxels differ from the default look.
    """
    shape = as_triple(size, "size", minimum=4)
    core_lo, core_hi = _check_range(core, "core")
    nec_lo, nec_hi = _check_range(necrosis, "necrosis")
    if int(lesions) != lesions or not 1 <= lesions <= 3:
        raise ValueError(f"lesions must be 1, 2 or 3, got {lesions!r}")
    if necrosis_look not in NECROSIS_LOOKS:
        raise ValueError(f"necrosis_look must be one of {NECROSIS_LOOKS}, got {necrosis_look!r}")
    rng = np.random.default_rng(seed)

    # ---- scalar parameters and coarse grids (independent of the size) ----
    head_c = rng.uniform(-0.03, 0.03, 3)
    head_r = np.array([0.80, 0.88, 0.86]) * rng.uniform(0.94, 1.04, 3)
    jitter = {k: np.asarray(v) * rng.uniform(0.92, 1.08, len(MODALITIES)) for k, v in _TISSUE.items()}
    vent_y, vent_z = rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.1)
    vent_r = np.array([0.07, 0.26, 0.12]) * rng.uniform(0.8, 1.2, 3)
    vent_dx = rng.uniform(0.10, 0.14)
    decoy_r = 0.15 * rng.uniform(0.8, 1.2)
    decoy_c = np.array([vent_dx + 0.04, vent_y - vent_r[1] - 0.08, vent_z])
    tumour_c = None
    for _ in range(100):  # tumour centre in the brain, away from both decoys
        cand = rng.uniform(-0.55, 0.55, 3)
        far = all(np.linalg.norm(cand - decoy_c * [s, 1, 1]) > decoy_r + 0.22 for s in (-1, 1))
        if np.linalg.norm(cand) < 0.55 and far:
            tumour_c = cand
            break
    if tumour_c is None:
        tumour_c = np.array([0.0, 0.35, -0.2])
    wt_r = rng.uniform(0.17, 0.36) * rng.uniform(0.75, 1.3, 3)
    core_frac = rng.uniform(core_lo, core_hi)
    nec_frac = rng.uniform(nec_lo, nec_hi)
    noise_sigma = rng.uniform(0.015, 0.04)
    grids = {
        "head": rng.standard_normal((5, 5, 5)),
        "gyri": rng.standard_normal((14, 14, 14)),
        "texture": rng.standard_normal((8, 8, 8)),
        "tumour": rng.standard_normal((12, 12, 12)),
        "hetero": rng.standard_normal((10, 10, 10)),
        "bias": rng.standard_normal((len(MODALITIES), 4, 4, 4)),
    }

    # ---- geometry ----
    u = _axes(shape)
    h = [(uk - ck) / rk for uk, ck, rk in zip(u, head_c, head_r)]  # head units
    rho = np.sqrt(h[0] ** 2 + h[1] ** 2 + h[2] ** 2) + 0.02 * _upsample(grids["head"], shape)
    head = rho <= 1.0
    brain = rho <= _BRAIN_OUTER
    gm = brain & (rho / _BRAIN_OUTER + 0.07 * _upsample(grids["gyri"], shape) > 0.87)
    ventricles = np.zeros(shape, dtype=bool)
    decoy = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        ventricles |= _ellipsoid_radius(h, (side * vent_dx, vent_y, vent_z), vent_r) <= 1.0
        decoy |= _ellipsoid_radius(h, decoy_c * [side, 1, 1], (decoy_r,) * 3) <= 1.0
    decoy &= brain & ~ventricles

    rho_t = _ellipsoid_radius(h, tumour_c, wt_r) + 0.3 * _upsample(grids["tumour"], shape)
    wt = brain & (rho_t <= 1.0)
    if not wt.any():  # tiny volumes: keep at least the brain voxel nearest the tumour centre
        d = _ellipsoid_radius(h, tumour_c, wt_r)
        d = np.where(brain, d, np.inf)
        wt.flat[int(np.argmin(d))] = True
    core = wt & (rho_t <= core_frac)
    necrosis = core & (rho_t <= core_frac * nec_frac)
    if lesions > 1:
        wt, core, necrosis = _add_lesions(h, brain, wt, core, necrosis, tumour_c, wt_r, decoy_c, decoy_r,
                                          int(lesions) - 1, np.random.default_rng([int(seed), 7919]), grids["tumour"])
    labels = np.zeros(shape, dtype=np.uint8)
    labels[wt] = 2
    labels[core] = 4
    labels[necrosis] = 1
    decoy &= ~wt

    # ---- intensities ----
    region = np.zeros(shape, dtype=np.uint8)  # painter's order: later layers win
    names = ["background", "scalp", "bone", "csf", "wm", "gm", "csf", "edema", "enhancing", "necrosis"]
    masks = [
        None, head, rho <= _SCALP_INNER, rho <= _BONE_INNER, brain, gm, ventricles & brain,
        labels == 2, labels == 4, labels == 1,
    ]
    for idx, m in enumerate(masks[1:], start=1):
        region[m] = idx
    lut = np.zeros((len(names), len(MODALITIES)), dtype=np.float32)
    for idx, name in enumerate(names[1:], start=1):
        lut[idx] = jitter["csf" if name == "necrosis" and necrosis_look == "csf" else name]
    image = lut.T[:, region]  # (4, D, H, W), contiguous
    texture = 1 + 0.06 * _upsample(grids["texture"], shape)
    image *= np.where(brain & ~wt, texture, 1.0)[None]
    hetero = 1 + 0.08 * _upsample(grids["hetero"], shape)
    image *= np.where(wt, hetero, 1.0)[None]
    for ch in range(len(MODALITIES)):  # decoy: edema's intensities in every channel
        image[ch][decoy] = jitter["edema"][ch] * hetero[decoy]

    image = _blur121(image)
    for ch in range(len(MODALITIES)):
        image[ch] *= np.exp(0.08 * _upsample(grids["bias"][ch], shape))
    n1 = rng.standard_normal(image.shape, dtype=np.float32)
    n2 = rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt((image + noise_sigma * n1) ** 2 + (noise_sigma * n2) ** 2)  # Rician
    image *= head[None]
    for ch in range(len(MODALITIES)):  # BraTS-style recipe: clip at the 99.5th percentile in the head, scale to [0, 1]
        top = np.percentile(image[ch][head], 99.5)
        image[ch] = np.clip(image[ch] / max(top, 1e-6), 0.0, 1.0)

    return PhantomCase(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=labels > 0,
        labels=labels,
        brain_mask=brain,
        head_mask=head,
        decoy_mask=decoy,
        case_id=case_id if case_id is not None else f"phantom_seed{seed}",
        seed=int(seed),
    )


def _add_lesions(h, brain, wt, core, necrosis, first_c, first_r, decoy_c, decoy_r, extra: int,
                 rng: np.random.Generator, tumour_grid: np.ndarray):
    """OR ``extra`` smaller tumours (edema / enhancing core / necrosis) into the region masks.

    Centres are drawn in the brain, away from the decoys and from every tumour already
    placed by more than the sum of their (noise-inflated) radii plus a margin of ~10 voxels
    at 64^3, so each lesion is its own 26-connected component after 3 dilations.
    """
    shape = wt.shape
    placed = [(np.asarray(first_c), 1.25 * float(np.max(first_r)))]
    for _ in range(extra):
        radii = rng.uniform(0.10, 0.16) * rng.uniform(0.85, 1.15, 3)
        reach = 1.4 * float(np.max(radii))
        centre = None
        for _ in range(200):
            cand = rng.uniform(-0.65, 0.65, 3)
            clear = all(np.linalg.norm(cand - c) > r + reach + 0.25 for c, r in placed)
            far = all(np.linalg.norm(cand - decoy_c * [s, 1, 1]) > decoy_r + reach + 0.1 for s in (-1, 1))
            if np.linalg.norm(cand) < 0.65 and clear and far:
                centre = cand
                break
        if centre is None:  # no room (tiny or crowded volume): fewer lesions
            break
        placed.append((centre, reach))
        rho = _ellipsoid_radius(h, centre, radii) + 0.3 * _upsample(np.roll(tumour_grid, 3 * len(placed), 0), shape)
        lesion = brain & (rho <= 1.0)
        core_frac, nec_frac = rng.uniform(0.45, 0.7), rng.uniform(0.3, 0.6)
        wt = wt | lesion
        core = core | (lesion & (rho <= core_frac))
        necrosis = necrosis | (lesion & (rho <= core_frac * nec_frac))
    return wt, core, necrosis


def case_seed(dataset_seed: int, index: int) -> int:
    """Seed of case ``index`` in ``make_phantom_dataset(..., seed=dataset_seed)`` (collision-resistant)."""
    return int(np.random.SeedSequence([int(dataset_seed), int(index)]).generate_state(1, np.uint32)[0])


def lesion_count(dataset_seed: int, index: int, multifocal: float) -> int:
    """Lesions of case ``index``: 2 or 3 with probability ``multifocal``, else 1 (own stream)."""
    if multifocal <= 0:
        return 1
    draw = np.random.default_rng([int(dataset_seed), int(index), 2]).random(2)
    return 1 + int(draw[0] < multifocal) * (1 + int(draw[1] < 0.5))


def make_phantom_dataset(n: int, size: int | tuple[int, int, int], seed: int, multifocal: float = 0.0,
                         **options) -> list[PhantomCase]:
    """``n`` independent cases with ids ``phantom_000``, ``phantom_001``, ... (deterministic in ``seed``).

    A fraction ``multifocal`` of the cases (in expectation) carries 2-3 separate lesions;
    ``options`` (``core``, ``necrosis``) go to :func:`make_phantom`."""
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= multifocal <= 1.0:
        raise ValueError(f"multifocal must be a fraction in [0, 1], got {multifocal!r}")
    return [make_phantom(size, case_seed(seed, i), case_id=f"phantom_{i:03d}",
                         lesions=lesion_count(seed, i, multifocal), **options) for i in range(int(n))]
