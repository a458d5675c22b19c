"""Synthetic BraTS-like phantoms: determinism, ranges, anatomy, contrasts and the decoy."""
import numpy as np
import pytest
from scipy import ndimage, stats

from patchddm_fast.data.layouts import MODALITIES
from patchddm_fast.data.phantom import make_phantom, make_phantom_dataset

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
        assert len(MODALITIES) == case.image.shape[0]


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
        # ... and is close to the tumour's edema in every channel: closer than the white matter is
        # on t2/flair (partial volume with the ventricles and the tumour core moves both a little)
        edema = case.labels == 2
        if edema.sum() > 20:
            for ch in range(4):
                assert abs(np.median(case.image[ch][case.decoy_mask]) - np.median(case.image[ch][edema])) < 0.15, ch
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


def _quadratic_features(image, coords=None):
    chans = [c.ravel() for c in image] + ([c.ravel() for c in coords] if coords is not None else [])
    feats = [np.ones_like(chans[0])] + chans + [a * b for i, a in enumerate(chans) for b in chans[i:]]
    return np.stack(feats, 1).astype(np.float64)


def test_an_intensity_only_model_marks_the_decoy_and_loses_without_t1_or_flair():
    """The phantom punishes shortcuts: the best per-voxel quadratic model of the four
    intensities (least squares on 6 training phantoms) flags a large share of the decoy
    voxels (which only position tells apart), and it gets worse without t1 and much worse
    with flair alone."""
    size = 48
    train = [make_phantom((size,) * 3, s) for s in range(6)]
    test = [make_phantom((size,) * 3, s) for s in range(100, 104)]

    def fit_predict(channels):
        x = np.concatenate([_quadratic_features(c.image[channels]) for c in train])
        y = np.concatenate([c.label.ravel() for c in train]).astype(np.float64)
        w = np.linalg.lstsq(x, y, rcond=None)[0]
        return [(_quadratic_features(c.image[channels]) @ w).reshape(c.label.shape) > 0.5 for c in test]

    def dice(preds):
        return np.mean([2 * (p & c.label).sum() / (p.sum() + c.label.sum()) for p, c in zip(preds, test)])

    all4 = fit_predict([0, 1, 2, 3])
    decoy_flagged = np.mean([p[c.decoy_mask].mean() for p, c in zip(all4, test)])
    edema_found = np.mean([p[c.labels == 2].mean() for p, c in zip(all4, test)])
    assert decoy_flagged > 0.4 * edema_found > 0.1, (decoy_flagged, edema_found)
    assert dice(fit_predict([1, 2, 3])) < dice(all4) - 0.02      # without t1
    assert dice(fit_predict([3])) < dice(all4) - 0.2              # flair alone


def test_large_necrosis_option_keeps_the_anatomy_and_grows_the_core():
    """Issue 13.1: LARGE_NECROSIS changes only the core/necrosis draws: same head, decoys and
    tumour outline per seed; the necrotic core becomes a fifth or more of the tumour (it is
    a few percent by default), inside a rim, and keeps its own contrast."""
    from patchddm_fast.data.phantom import LARGE_NECROSIS

    fractions = []
    for seed in range(4):
        base, large = make_phantom(48, seed), make_phantom(48, seed, **LARGE_NECROSIS)
        for key in ("label", "brain_mask", "head_mask", "decoy_mask"):
            np.testing.assert_array_equal(getattr(base, key), getattr(large, key))
        nec = large.labels == 1
        fractions.append((nec.sum() / large.label.sum(), (base.labels == 1).sum() / base.label.sum()))
        # the core is enclosed by tumour: dilating it stays inside WT (away from the outline's noise)
        assert (ndimage.binary_dilation(nec) & ~large.label).sum() < 0.05 * nec.sum()
    big, default = np.array(fractions).T
    assert big.mean() > 0.2 and default.mean() < 0.1 and np.all(big > default)
    with pytest.raises(ValueError, match="necrosis"):
        make_phantom(16, 0, necrosis=(0.8, 0.4))
    with pytest.raises(ValueError, match="core"):
        make_phantom(16, 0, core=0.5)
    ds = make_phantom_dataset(2, 16, 3, **LARGE_NECROSIS)
    np.testing.assert_array_equal(ds[1].labels, make_phantom(16, ds[1].seed, **LARGE_NECROSIS).labels)


def test_csf_like_necrosis_changes_only_the_core_look():
    """Issue 13.1: necrosis_look="csf" gives the necrotic core the case's CSF intensities in
    all four channels (FLAIR-dark, as liquefied necrosis often is) and draws nothing else:
    same labels and anatomy; the default look is what the option's default gives."""
    from patchddm_fast.data.phantom import LARGE_NECROSIS

    flair, t1ce = MODALITIES.index("flair"), MODALITIES.index("t1ce")
    for seed in range(3):
        base = make_phantom(48, seed, **LARGE_NECROSIS)
        csf = make_phantom(48, seed, necrosis_look="csf", **LARGE_NECROSIS)
        np.testing.assert_array_equal(base.image, make_phantom(48, seed, necrosis_look="default", **LARGE_NECROSIS).image)
        for key in ("labels", "brain_mask", "head_mask", "decoy_mask"):
            np.testing.assert_array_equal(getattr(base, key), getattr(csf, key))
        core = ndimage.binary_erosion(csf.labels == 1)  # away from the partial-volume blur of the rim
        assert core.sum() >= 5
        ventricle_flair = np.median(csf.image[flair][csf.brain_mask & (csf.image[MODALITIES.index("t2")] > 0.8)
                                                     & (csf.labels == 0) & ~csf.decoy_mask])
        assert csf.image[flair][core].mean() < 0.5 * base.image[flair][core].mean()  # FLAIR-dark now
        assert csf.image[flair][core].mean() < ventricle_flair + 0.1
        assert csf.image[t1ce][core].mean() < 0.3
        far = ~ndimage.binary_dilation(csf.labels == 1, iterations=2)
        close = np.isclose(base.image[:, far], csf.image[:, far], atol=0.05).mean()
        assert close > 0.99  # elsewhere only the per-channel percentile scaling may move
    with pytest.raises(ValueError, match="necrosis_look"):
        make_phantom(16, 0, necrosis_look="bright")


def test_config_phantom_options_reach_the_training_and_validation_phantoms():
    from patchddm_fast.training.config import TrainConfig
    from patchddm_fast.data.phantom import LARGE_NECROSIS
    from patchddm_fast.training.sources import VALIDATION_SEED_OFFSET, load_cases

    cfg = TrainConfig(phantom_size=16, phantom_train=2, phantom_val=1, seed=5,
                      phantom_options={k: list(v) for k, v in LARGE_NECROSIS.items()})  # as read from JSON
    train, val = load_cases(TrainConfig.from_dict(cfg.to_dict()), 8)
    np.testing.assert_array_equal(train[1].image.numpy(), make_phantom_dataset(2, 16, 5, **LARGE_NECROSIS)[1].image)
    np.testing.assert_array_equal(val[0].image.numpy(),
                                  make_phantom_dataset(1, 16, 5 + VALIDATION_SEED_OFFSET, **LARGE_NECROSIS)[0].image)
    assert not np.array_equal(train[1].image.numpy(), make_phantom_dataset(2, 16, 5)[1].image)
