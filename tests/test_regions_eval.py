"""BraTS label conventions, nested regions and lesion-wise metrics against independent references.

* Regions: round trips between label maps and WT/TC/ET masks in both BraTS conventions.
* Whole-mask Dice and HD95 per region: MONAI's metrics (an independent implementation).
* Lesion-wise Dice/HD95 (BraTS 2023): hand-built cases with answers worked out by hand, and
  random cases against a second, deliberately naive transcription of the definition
  (own flood fill, own shift-based dilation).
"""
from collections import deque

import numpy as np
import pytest
import torch

from patchddm_fast.eval.lesionwise import FP_HD95_MM, lesion_wise
from patchddm_fast.eval.metrics import dice, hd95
from patchddm_fast.data.regions import (BRATS2023_REGIONS, BRATS_REGIONS, detect_convention, label_map, nest_regions,
                                   region_masks)


# --------------------------------------------------------------------------- conventions and regions
@pytest.mark.parametrize("values, expected", [
    ({0, 1}, "binary"), ({0}, "binary"), ({0, 1, 2, 4}, "brats2020"), ({0, 2, 4}, "brats2020"),
    ({0, 1, 2, 3}, "brats2023"), ({0, 3}, "brats2023"), ({0, 1, 2}, "brats2020"),
])
def test_detect_convention(values, expected):
    assert detect_convention(values) == expected


def test_detect_convention_rejects_mixtures_and_unknown_values():
    with pytest.raises(ValueError, match="x.nii.gz: labels contain both 3 and 4"):
        detect_convention({0, 3, 4}, source="x.nii.gz")
    with pytest.raises(ValueError, match=r"y.nii.gz: label values \[7\] belong to no known convention"):
        detect_convention({0, 7}, source="y.nii.gz")


@pytest.mark.parametrize("convention, regions", [("brats2020", BRATS_REGIONS), ("brats2023", BRATS2023_REGIONS)])
def test_label_map_round_trip(convention, regions):
    rng = np.random.default_rng(3)
    values = sorted({v for r in regions.values() for v in r} | {0})
    labels = rng.choice(values, size=(6, 7, 8)).astype(np.uint8)
    masks = region_masks(labels, convention)
    for i, name in enumerate(("WT", "TC", "ET")):
        np.testing.assert_array_equal(masks[i], np.isin(labels, regions[name]))
    np.testing.assert_array_equal(label_map(masks, convention), labels)
    torch_masks = region_masks(torch.from_numpy(labels), convention)
    np.testing.assert_array_equal(torch_masks.numpy(), masks)


def test_conflicting_channels_resolve_outside_in():
    rng = np.random.default_rng(4)
    raw = rng.random((3, 5, 5, 5)) < 0.5  # arbitrary, not nested
    nested = nest_regions(raw)
    assert not (nested[1] & ~nested[0]).any() and not (nested[2] & ~nested[1]).any()
    np.testing.assert_array_equal(nested[0], raw[0])  # WT is never enlarged or shrunk
    np.testing.assert_array_equal(nested[2], raw[2] & raw[1] & raw[0])
    lab = label_map(raw, "brats2020")
    np.testing.assert_array_equal(region_masks(lab, "brats2020"), nested)
    probs = rng.random((3, 4, 4, 4))
    p = nest_regions(probs)
    assert (p[1] <= p[0]).all() and (p[2] <= p[1]).all()


# --------------------------------------------------------------------------- whole-region metrics vs MONAI
def test_region_dice_and_hd95_match_monai():
    from monai.metrics import compute_dice, compute_hausdorff_distance

    rng = np.random.default_rng(5)
    spacing = (1.0, 1.2, 1.5)
    g = np.indices((18, 20, 16)).astype(float)
    for trial in range(6):
        c = rng.uniform(5, 12, 3)
        r = rng.uniform(2, 6, 3)
        gt = sum(((g[i] - c[i]) / r[i]) ** 2 for i in range(3)) <= 1
        pred = sum(((g[i] - c[i] - rng.normal(0, 1)) / (r[i] * rng.uniform(0.7, 1.3))) ** 2 for i in range(3)) <= 1
        pred ^= rng.random(gt.shape) < 0.01  # scattered errors, so surfaces are irregular
        p = torch.from_numpy(pred)[None, None].float()
        t = torch.from_numpy(gt)[None, None].float()
        assert dice(pred, gt) == pytest.approx(float(compute_dice(p, t, include_background=True)), abs=1e-6)
        ref = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing))
        assert hd95(pred, gt, spacing=spacing) == pytest.approx(ref, abs=1e-3)


# --------------------------------------------------------------------------- lesion-wise: hand-built cases
def cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


SHAPE = (40, 40, 40)


def test_one_hit_one_miss_one_false_positive():
    gt = cube(SHAPE, (2, 2, 2), 4) | cube(SHAPE, (30, 30, 30), 4)
    pred = cube(SHAPE, (2, 2, 2), 4) | cube(SHAPE, (2, 30, 30), 3)
    r = lesion_wise(pred, gt)
    assert (r.n_tp, r.n_fn, r.n_fp) == (1, 1, 1)
    assert r.dice == pytest.approx(1 / 3)
    assert r.hd95 == pytest.approx((0 + FP_HD95_MM + FP_HD95_MM) / 3)


def test_small_lesions_are_ignored_detected_or_not():
    big = cube(SHAPE, (5, 5, 5), 5)  # 125 voxels > 50 mm^3
    small = cube(SHAPE, (30, 30, 30), 3)  # 27 voxels <= 50 mm^3
    assert lesion_wise(big, big | small).dice == 1.0  # missed small lesion: not counted
    assert lesion_wise(big | small, big | small).dice == 1.0  # found: neither counted nor a false positive
    assert lesion_wise(big | small, big | small).n_fp == 0
    # the threshold is a volume: the same 125 voxels at 0.5 mm are 15.6 mm^3, so nothing is counted
    r = lesion_wise(np.zeros(SHAPE, bool), big, spacing=(0.5, 0.5, 0.5))
    assert (r.dice, r.hd95, r.n_fn) == (1.0, 0.0, 0)


def test_lesions_closer_than_the_dilation_merge():
    a, b = cube(SHAPE, (5, 5, 5), 4), cube(SHAPE, (5, 5, 11), 4)  # a gap of 2 voxels: the dilations touch
    r = lesion_wise(a, a | b)
    assert len(r.lesions) == 1 and r.n_tp == 1
    assert r.dice == pytest.approx(2 * 64 / (64 + 128))
    far = cube(SHAPE, (5, 5, 25), 4)  # a gap of 16 voxels: two lesions
    r = lesion_wise(a, a | far)
    assert len(r.lesions) == 2 and (r.n_tp, r.n_fn) == (1, 1)
    assert r.dice == pytest.approx(0.5)


def test_prediction_near_but_outside_a_lesion_matches_it():
    gt = cube(SHAPE, (10, 10, 10), 5)
    near = cube(SHAPE, (10, 10, 17), 3)  # 2 voxels off the lesion: inside its 3-fold dilation
    r = lesion_wise(near, gt)
    assert (r.n_tp, r.n_fp) == (1, 0)
    assert r.dice == 0.0
    assert r.hd95 == pytest.approx(hd95(near, gt))


def test_empty_ground_truth():
    pred = cube(SHAPE, (2, 2, 2), 3) | cube(SHAPE, (20, 20, 20), 3)
    r = lesion_wise(pred, np.zeros(SHAPE, bool))
    assert (r.dice, r.hd95, r.n_fp) == (0.0, FP_HD95_MM, 2)
    r = lesion_wise(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool))
    assert (r.dice, r.hd95) == (1.0, 0.0)


# --------------------------------------------------------------------------- lesion-wise: a second implementation
_OFFSETS_26 = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)]
_OFFSETS_18 = [o for o in _OFFSETS_26 if sum(map(abs, o)) <= 2]


def naive_components(mask):
    labels = np.zeros(mask.shape, np.int64)
    n = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        queue = deque([start])
        while queue:
            p = queue.popleft()
            for o in _OFFSETS_26:
                q = tuple(a + b for a, b in zip(p, o))
                if all(0 <= q[i] < mask.shape[i] for i in range(3)) and mask[q] and not labels[q]:
                    labels[q] = n
                    queue.append(q)
    return labels


def naive_dilate(mask, iterations):
    out = mask.copy()
    for _ in range(iterations):
        grown = out.copy()
        padded = np.pad(out, 1)
        for o in _OFFSETS_18:
            grown |= padded[tuple(slice(1 - d, 1 - d + n) for d, n in zip(o, out.shape))]
        out = grown
    return out


def naive_lesion_wise(pred, gt, spacing=(1, 1, 1), dilation=3, threshold=50.0):
    pred_cc = naive_components(pred)
    groups = naive_components(naive_dilate(gt, dilation)) * gt
    terms, dices, hds, matched = 0, [], [], set()
    for index in sorted(set(np.unique(groups)) - {0}):
        lesion = groups == index
        hits = set(np.unique(pred_cc[naive_dilate(lesion, dilation)])) - {0}
        matched |= hits
        p = np.isin(pred_cc, list(hits))
        if lesion.sum() * np.prod(spacing) > threshold:
            dices.append(dice(p, lesion))
            hds.append(hd95(p, lesion, spacing=spacing) if hits else FP_HD95_MM)
    fp = len(set(np.unique(pred_cc)) - {0} - matched)
    terms = len(dices) + fp
    if terms == 0:
        return 1.0, 0.0
    return sum(dices) / terms, (sum(hds) + FP_HD95_MM * fp) / terms


def random_lesions(rng, shape, n):
    g = np.indices(shape).astype(float)
    m = np.zeros(shape, bool)
    for _ in range(n):
        c, r = rng.uniform(2, np.array(shape) - 2), rng.uniform(1.0, 4.0, 3)
        m |= sum(((g[i] - c[i]) / r[i]) ** 2 for i in range(3)) <= 1
    return m


@pytest.mark.parametrize("seed", range(6))
def test_lesion_wise_matches_a_naive_transcription(seed):
    rng = np.random.default_rng(seed)
    shape = (22, 20, 18)
    gt = random_lesions(rng, shape, rng.integers(0, 5))
    pred = random_lesions(rng, shape, rng.integers(0, 5)) | (gt & (rng.random(shape) < 0.7))
    spacing = (1.0, 1.0, 1.0) if seed % 2 else (1.0, 0.9, 1.4)
    r = lesion_wise(pred, gt, spacing)
    d, h = naive_lesion_wise(pred, gt, spacing)
    assert r.dice == pytest.approx(d, abs=1e-6)
    assert r.hd95 == pytest.approx(h, abs=1e-3)
