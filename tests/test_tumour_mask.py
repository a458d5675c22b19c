"""Issue 13.1: the one function that turns an ensemble mean into a segmentation fills the gaps
the whole tumour and the tumour core enclose, and nothing else.

The reference for "enclosed" is a naive flood fill of the background from the volume's
border (6-connected steps), written here independently of scipy.
"""
from collections import deque

import numpy as np
import pytest
import torch

from patchddm_fast.data.regions import nest_regions, tumour_mask


def flood_fill_reference(mask: np.ndarray) -> np.ndarray:
    """mask | (background not reachable from the border through 6-connected background)."""
    reach = np.zeros_like(mask, dtype=bool)
    todo = deque()
    for idx in zip(*np.nonzero(~mask)):
        if any(i == 0 or i == n - 1 for i, n in zip(idx, mask.shape)):
            reach[idx] = True
            todo.append(idx)
    while todo:
        idx = todo.popleft()
        for axis in range(3):
            for step in (-1, 1):
                nb = list(idx)
                nb[axis] += step
                nb = tuple(nb)
                if all(0 <= i < n for i, n in zip(nb, mask.shape)) and not mask[nb] and not reach[nb]:
                    reach[nb] = True
                    todo.append(nb)
    return mask | ~reach


def ball(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def test_a_ring_is_filled_and_a_ball_is_unchanged():
    ring = ball((20, 20, 20), (10, 10, 10), 7) & ~ball((20, 20, 20), (10, 10, 10), 3.5)
    filled = tumour_mask(ring.astype(np.float32), 0.5)
    np.testing.assert_array_equal(filled, ball((20, 20, 20), (10, 10, 10), 7))
    np.testing.assert_array_equal(tumour_mask(ring.astype(np.float32), 0.5, fill_holes=False), ring)


def test_a_gap_open_to_the_border_is_kept():
    cup = ball((16, 16, 16), (8, 8, 8), 6) & ~ball((16, 16, 16), (8, 8, 8), 3)
    cup[8:, 7:10, 7:10] = False  # a channel from the cavity to the border
    out = tumour_mask(cup.astype(np.float32), 0.5)
    np.testing.assert_array_equal(out, flood_fill_reference(cup))
    assert not out[8, 8, 8]


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_flood_fill_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    mean = rng.random((12, 13, 11)).astype(np.float32)
    mean = (mean + np.roll(mean, 1, 0) + np.roll(mean, 1, 1)) / 3  # some structure, many enclosed gaps
    for threshold in (0.4, 0.5, 0.6):
        np.testing.assert_array_equal(tumour_mask(mean, threshold), flood_fill_reference(mean > threshold))


def test_regions_fill_whole_tumour_and_core_but_not_the_enhancing_rim():
    shape = (24, 24, 24)
    wt = ball(shape, (12, 12, 12), 9) & ~ball(shape, (12, 12, 12), 3)  # the necrotic centre missed
    et = ball(shape, (12, 12, 12), 6) & ~ball(shape, (12, 12, 12), 4)  # an enhancing rim around it
    tc = et.copy()
    mean = np.stack([wt, tc, et]).astype(np.float32)
    out = tumour_mask(mean, 0.5)
    np.testing.assert_array_equal(out[0], flood_fill_reference(wt))
    np.testing.assert_array_equal(out[1], flood_fill_reference(tc) & out[0])
    np.testing.assert_array_equal(out[2], et)  # the rim keeps its hole
    assert out[0, 12, 12, 12] and out[1, 12, 12, 12] and not out[2, 12, 12, 12]
    assert (out[1] <= out[0]).all() and (out[2] <= out[1]).all()  # still nested
    np.testing.assert_array_equal(tumour_mask(mean, 0.5, fill_holes=False), nest_regions(mean > 0.5))


def test_torch_in_torch_out():
    ring = ball((10, 10, 10), (5, 5, 5), 4) & ~ball((10, 10, 10), (5, 5, 5), 1.5)
    out = tumour_mask(torch.from_numpy(ring.astype(np.float32)), 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.device.type == "cpu"
    np.testing.assert_array_equal(out.numpy(), flood_fill_reference(ring))
