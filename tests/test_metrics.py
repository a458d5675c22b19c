"""Dice / HD95: hand-derived cases, empty masks, errors, and a scipy.ndimage cross-check."""
import math

import numpy as np
import pytest
from scipy import ndimage

from patchddm_fast.eval.metrics import dice, hd95, surface, surface_distances

METHODS = ("auto", "edt", "pairwise")


def _plate(shape, i, j, k):
    """Mask with True on the index ranges/ints i, j, k."""
    m = np.zeros(shape, dtype=bool)
    m[i, j, k] = True
    return m


# ---------------------------------------------------------------- Dice
def test_dice_hand_computed():
    a = _plate((10, 10, 10), slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    b = _plate((10, 10, 10), slice(2, 6), slice(0, 4), slice(0, 4))  # 64 voxels, overlap 2*4*4 = 32
    assert dice(a, b) == pytest.approx(2 * 32 / 128)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0


def test_dice_accepts_01_numeric_and_rejects_probabilities():
    a = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    assert dice(a, a.astype(np.float32)) == 1.0
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        dice(a, np.array([[0.2, 1], [1, 1]]))


# ---------------------------------------------------------------- surface
def test_surface_of_solid_cube_and_border_convention():
    cube = _plate((9, 9, 9), slice(2, 7), slice(2, 7), slice(2, 7))
    assert surface(cube).sum() == 5**3 - 3**3
    full = np.ones((4, 4, 4), dtype=bool)  # border voxels count as surface (outside = background)
    s = surface(full)
    assert s.sum() == 4**3 - 2**3
    assert not s[1:3, 1:3, 1:3].any()


def test_surface_matches_scipy_erosion():
    rng = np.random.default_rng(1)
    m = ndimage.gaussian_filter(rng.normal(size=(15, 12, 9)), 1.5) > 0
    expected = m & ~ndimage.binary_erosion(m)  # default: 6-neighbour structure, border_value=0
    np.testing.assert_array_equal(surface(m), expected)


# ---------------------------------------------------------------- HD95 by hand
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("axis,k", [(0, 3), (1, 2), (2, 4)])
def test_parallel_plates_offset_along_anisotropic_axis(method, axis, k):
    """Two 1-voxel-thick plates offset by k voxels along ``axis``: every surface distance is k * spacing[axis]."""
    spacing = (0.5, 1.0, 3.0)
    sl = [slice(1, 6)] * 3
    sl[axis] = 1
    a = _plate((12, 12, 12), *sl)
    sl[axis] = 1 + k
    b = _plate((12, 12, 12), *sl)
    expected = k * spacing[axis]
    assert hd95(a, b, spacing, method=method) == pytest.approx(expected, abs=1e-12)
    assert hd95(a, b, spacing, pooled=True, method=method) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(surface_distances(a, b, spacing, method=method), expected, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_single_voxels(method):
    spacing = (1.2, 0.7, 2.5)
    a = _plate((8, 9, 10), 1, 2, 3)
    b = _plate((8, 9, 10), 6, 0, 9)
    expected = math.sqrt((5 * 1.2) ** 2 + (2 * 0.7) ** 2 + (6 * 2.5) ** 2)
    assert hd95(a, b, spacing, method=method) == pytest.approx(expected, rel=1e-12)
    assert hd95(a, b, spacing, pooled=True, method=method) == pytest.approx(expected, rel=1e-12)
    assert hd95(a, a, spacing, method=method) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_outlier_voxel_percentile_interpolation(method):
    """B = A (a 3x3 plate) plus one voxel at distance d from the plate.

    Directed A->B: 9 zeros.  B->A: 9 zeros and d.  np.percentile linear interpolation:
    10 values -> position 0.95 * 9 = 8.55 -> 0.55 d;  pooled 19 values -> 0.95 * 18 = 17.1 -> 0.1 d.
    """
    spacing = (1.0, 1.0, 2.0)
    a = _plate((7, 7, 14), slice(2, 5), slice(2, 5), 2)
    b = a.copy()
    b[3, 3, 10] = True
    d = 8 * 2.0
    assert hd95(a, b, spacing, method=method) == pytest.approx(0.55 * d)
    assert hd95(b, a, spacing, method=method) == pytest.approx(0.55 * d)
    assert hd95(a, b, spacing, pooled=True, method=method) == pytest.approx(0.1 * d)
    assert hd95(a, b, spacing, percentile=100, method=method) == pytest.approx(d)


def test_other_dimensionalities():
    a1 = np.zeros(20, dtype=bool)
    a1[2:5] = True
    b1 = np.zeros(20, dtype=bool)
    b1[10:12] = True  # surfaces {2,4} and {10,11}: A->B [8, 6], B->A [6, 7]
    assert hd95(a1, b1, spacing=(0.5,)) == pytest.approx(0.5 * max(np.percentile([8, 6], 95), np.percentile([6, 7], 95)))
    a2 = _plate((6, 6, 1), 1, 1, 0)[..., 0]
    b2 = _plate((6, 6, 1), 4, 5, 0)[..., 0]
    assert hd95(a2, b2, spacing=(2.0, 1.0)) == pytest.approx(math.hypot(6.0, 4.0))


# ---------------------------------------------------------------- empty / errors
def test_empty_masks():
    empty = np.zeros((5, 5, 5), dtype=bool)
    one = empty.copy()
    one[2, 2, 2] = True
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    assert hd95(one, empty) == math.inf and hd95(empty, one, pooled=True) == math.inf
    assert hd95(one, empty, empty_value=373.13) == 373.13
    assert surface_distances(empty, one).size == 0
    assert np.isinf(surface_distances(one, empty)).all()


def test_bad_input_errors():
    a = np.zeros((4, 5, 6), dtype=bool)
    b = np.zeros((4, 5, 7), dtype=bool)
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        hd95(a, b)
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        dice(a, b)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        hd95(a, a, method="kdtree")


# ---------------------------------------------------------------- scipy cross-check
def _scipy_reference(a, b, spacing):
    """Independent HD95 (both variants): scipy erosion + exact EDT with sampling=spacing."""
    sa = a & ~ndimage.binary_erosion(a)
    sb = b & ~ndimage.binary_erosion(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    per_direction = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return per_direction, np.percentile(np.concatenate([d_ab, d_ba]), 95), d_ab


def _blob(rng, shape, sigma, level):
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma) > level


@pytest.mark.parametrize("seed", range(6))
def test_matches_scipy_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(8, 28, size=3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, size=3))
    a = _blob(rng, shape, 2.0, 0.05)
    if seed % 2 == 0:  # a prediction-like copy: shifted by one voxel, with flipped speckles
        b = np.roll(a, 1, axis=seed % 3) ^ (rng.random(shape) > 0.97)
    else:  # an unrelated blob
        b = _blob(rng, shape, 2.0, 0.05)
    assert a.any() and b.any()
    ref, ref_pooled, ref_dab = _scipy_reference(a, b, spacing)
    expected_dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert abs(dice(a, b) - expected_dice) < 1e-6
    for method in METHODS:
        assert abs(hd95(a, b, spacing, method=method) - ref) < 1e-3
        assert abs(hd95(a, b, spacing, pooled=True, method=method) - ref_pooled) < 1e-3
        np.testing.assert_allclose(surface_distances(a, b, spacing, method=method), ref_dab, atol=1e-9)


def test_matches_scipy_small_masks_far_apart():
    """Tiny masks in a mostly empty box (where 'auto' picks the pairwise path)."""
    rng = np.random.default_rng(7)
    a = np.zeros((40, 30, 20), dtype=bool)
    b = np.zeros_like(a)
    a[2:5, 3:5, 1:4] = True
    b[33:38, 20:27, 15:19] = rng.random((5, 7, 4)) > 0.4
    spacing = (0.9, 1.1, 2.2)
    ref, ref_pooled, _ = _scipy_reference(a, b, spacing)
    for method in METHODS:
        assert abs(hd95(a, b, spacing, method=method) - ref) < 1e-3
        assert abs(hd95(a, b, spacing, pooled=True, method=method) - ref_pooled) < 1e-3
