"""Synthetic BraTS-like phantoms: determinism, ranges, anatomy, contrasts and the decoy."""
import numpy as np
import pytest
from scipy import ndimage, stats

from patchddm_fast.data.phantom import CHANNELS, make_phantom, make_phantom_dataset

SIZE = 64
SEEDS = range(6)


@pytest.fixture(scope="module")
def cases():
    return [make_phantom(SIZE, seed) for seed in SEEDS]


def _arrays(case):
    return {k: getattr(case, k) for k in ("image", "label", "labels", "brain_mask", "head_mask", "decoy_mask")}


def test_deterministic_per_seed():
    a, b, c = make_phantom(32, 11), make_phantom(32, 11), make_phantom(32, 12)
    for key, value in _arrays(a).items():
        np.testing.assert_array_equal(value, _arrays(b)[key])
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


def test_dtypes_shapes_and_ranges(cases):
    for case in cases:
        assert case.image.dtype == np.float32 and case.image.shape == (4, SIZE, SIZE, SIZE)
        assert case.image.flags["C_CONTIGUOUS"]
        assert case.label.dtype == bool and case.labels.dtype == np.uint8
        assert case.image.min() >= 0.0 and case.image.max() <= 1.0
        assert set(np.unique(case.labels)) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(case.label, case.labels > 0)
        assert np.all(case.image[:, ~case.head_mask] == 0.0)  # exact zeros outside the head
        assert (case.image[:, case.brain_mask] > 0).mean() > 0.99
        assert len(CHANNELS) == case.image.shape[0]


def test_tumour_inside_brain_nested_and_sized(cases):
    fractions = []
    for case in cases:
        assert case.label.any()
        assert not (case.label & ~case.brain_mask).any()
        assert not (case.brain_mask & ~case.head_mask).any()
        # nesting of BraTS regions: ET within TC within WT
        assert not (case.enhancing_tumour & ~case.tumour_core).any()
        assert not (case.tumour_core & ~case.whole_tumour).any()
        fractions.append(case.label.sum() / case.brain_mask.sum())
    assert min(fractions) > 0.003 and max(fractions) < 0.25
    assert max(fractions) / min(fractions) > 1.5  # random tumour sizes
    centres = np.array([np.argwhere(c.label).mean(axis=0) for c in cases])
    assert np.ptp(centres, axis=0).max() > SIZE / 8  # random positions


def _region_means(case, mask):
    return case.image[:, mask].mean(axis=1)


def _surroundings_median(case, width=3):
    """Per-channel median of the normal brain within ``width`` voxels of the tumour (robust to CSF)."""
    ring = ndimage.binary_dilation(case.label, iterations=width) & ~case.label & case.brain_mask & ~case.decoy_mask
    return np.median(case.image[:, ring], axis=1)


def test_channel_contrasts_differ_inside_tumour(cases):
    """Each compartment's designed contrast holds in every case (means over the region)."""
    t1, t1ce, t2, flair = range(4)
    checked_enhancing = 0
    for case in cases:
        normal = _surroundings_median(case)
        edema = _region_means(case, case.labels == 2)
        assert edema[flair] > normal[flair] and edema[t2] > normal[t2] and edema[t1] < normal[t1]
        if (case.labels == 4).sum() >= 5:
            checked_enhancing += 1
            enh = _region_means(case, case.labels == 4)
            assert enh[t1ce] > edema[t1ce] and enh[t1ce] > normal[t1ce]
            assert enh[t1ce] - enh[t1] > edema[t1ce] - edema[t1]  # contrast uptake shows only on t1ce
        if (case.labels == 1).sum() >= 5:
            assert _region_means(case, case.labels == 1)[t1] < edema[t1]
    assert checked_enhancing >= 3
    # channels really differ voxel-wise inside the tumour: flair and t1 do not rank voxels alike
    case = cases[0]
    rho = stats.spearmanr(case.image[t1][case.label], case.image[flair][case.label]).statistic
    assert rho < 0.5


def test_decoy_mimics_edema_on_flair_but_is_not_labelled(cases):
    for case in cases:
        assert case.decoy_mask.sum() > 10
        assert not (case.decoy_mask & case.label).any()
        assert not (case.decoy_mask & ~case.brain_mask).any()
        normal = case.brain_mask & ~case.label & ~case.decoy_mask
        flair_decoy = case.image[3][case.decoy_mask]
        flair_normal = case.image[3][normal]
        # decoy is significantly brighter than normal brain on flair (one-sided Mann-Whitney)
        assert stats.mannwhitneyu(flair_decoy, flair_normal, alternative="greater").pvalue < 1e-6
        # ... while on t1 it is iso-intense with the surrounding white matter, unlike the t1-dark edema
        edema = case.labels == 2
        if edema.sum() > 20:
            assert case.image[0][case.decoy_mask].mean() > case.image[0][edema].mean()
        # a symmetric pair across the left-right (axis 0) mid-plane
        xs = np.argwhere(case.decoy_mask)[:, 0]
        assert (xs < SIZE / 2).any() and (xs >= SIZE / 2).any()


def test_non_cubic_and_dataset():
    case = make_phantom((40, 32, 24), 3)
    assert case.image.shape == (4, 40, 32, 24) and case.labels.shape == (40, 32, 24)
    assert case.label.any() and case.decoy_mask.any()
    ds = make_phantom_dataset(3, (24, 20, 16), seed=5)
    assert [c.case_id for c in ds] == ["phantom_000", "phantom_001", "phantom_002"]
    assert len({c.seed for c in ds}) == 3
    again = make_phantom_dataset(3, (24, 20, 16), seed=5)
    np.testing.assert_array_equal(ds[2].image, again[2].image)
    rebuilt = make_phantom((24, 20, 16), ds[1].seed)
    np.testing.assert_array_equal(rebuilt.image, ds[1].image)


def test_bad_size():
    with pytest.raises(ValueError, match="size"):
        make_phantom((32, 32), 0)
    with pytest.raises(ValueError, match="size"):
        make_phantom(2, 0)
