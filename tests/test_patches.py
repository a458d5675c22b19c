"""PatchDDM data path: offset distributions, coordinate channels, decimate, pad/unpad, input order."""
import numpy as np
import pytest
import torch
from scipy import stats

from patchddm_fast.data.patches import (
    PatchOffsetSampler,
    decimate,
    pad_to_multiple,
    pad_to_shape,
    trapezoid_split,
    unpad,
)
from patchddm_fast.model.conditioning import condition, network_input
from patchddm_fast.model.method import get_method


def _trapezoid_closed_form(a: int, b: int) -> np.ndarray:
    """P(U{0..a} + U{0..b} = k) = #{i in [0, a] : k - i in [0, b]} / ((a+1)(b+1))."""
    k = np.arange(a + b + 1)
    count = np.minimum(k, a) - np.maximum(0, k - b) + 1
    return count / ((a + 1) * (b + 1))


def test_paper_configuration_pmf():
    sampler = PatchOffsetSampler(256, 128)
    assert trapezoid_split(128) == (32, 96)
    expected = _trapezoid_closed_form(32, 96)
    for axis in range(3):
        pmf = sampler.pmf(axis)
        assert pmf.shape == (129,)
        np.testing.assert_allclose(pmf, expected, rtol=1e-12, atol=1e-15)
    # flat top between 32 and 96, ends 33x rarer; patch centres offset + 64 lie in [64, 192]
    assert np.allclose(expected[32:97], 1 / 97) and expected[0] == pytest.approx(expected[32] / 33)


@pytest.mark.parametrize(
    "volume,patch,distribution",
    [
        (256, 128, "trapezoid"),
        ((40, 24, 17), (16, 16, 16), "trapezoid"),
        ((64, 48, 32), (32, 32, 31), "trapezoid"),
        ((40, 24, 17), (16, 16, 16), "uniform"),
    ],
)
def test_sampled_offsets_follow_pmf(volume, patch, distribution):
    """Chi-square goodness of fit of 20000 draws per axis against the exact pmf."""
    sampler = PatchOffsetSampler(volume, patch, distribution)
    rng = np.random.default_rng(1234)
    draws = np.array([sampler.sample(rng) for _ in range(20000)])
    for axis in range(3):
        span = sampler.spans[axis]
        assert draws[:, axis].min() >= 0 and draws[:, axis].max() <= span
        if span == 0:
            assert (draws[:, axis] == 0).all()
            continue
        pmf = sampler.pmf(axis)
        if distribution == "uniform":
            np.testing.assert_allclose(pmf, 1 / (span + 1))
        else:
            np.testing.assert_allclose(pmf, _trapezoid_closed_form(*trapezoid_split(span)))
        observed = np.bincount(draws[:, axis], minlength=span + 1)
        assert stats.chisquare(observed, pmf * len(draws)).pvalue > 1e-3


def test_sampler_edge_cases_and_errors():
    sampler = PatchOffsetSampler((16, 17, 20), (16, 16, 16))
    np.testing.assert_array_equal(sampler.pmf(0), [1.0])  # patch fills the axis: offset 0
    np.testing.assert_allclose(sampler.pmf(1), [0.5, 0.5])
    with pytest.raises(ValueError, match="exceeds volume_shape"):
        PatchOffsetSampler((64, 64, 32), (64, 64, 64))
    with pytest.raises(ValueError, match="distribution"):
        PatchOffsetSampler(64, 32, "gaussian")
    with pytest.raises(ValueError, match="patch_shape"):
        PatchOffsetSampler(64, (32, 32))


def test_coordinate_channels_are_the_whole_volume_ramps_cropped_with_the_patch():
    """PatchDDM's channels 4..6: channel k is ``torch.linspace(-1, 1, V_k)`` along axis k over the
    whole padded volume, cropped together with the image, so a patch sees its own sub-ramp."""
    volume, patch = (24, 20, 16), (8, 8, 8)
    image = torch.rand(4, *volume)
    whole = condition(image, "patchddm")
    assert whole.shape == (7, *volume) and whole.dtype == torch.float32
    assert torch.equal(whole[:4], image * 2 - 1)
    assert torch.equal(whole[4:, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.equal(whole[4:, -1, -1, -1], torch.tensor([1.0, 1.0, 1.0]))
    offset = PatchOffsetSampler(volume, patch).sample(np.random.default_rng(0))
    window = tuple(slice(o, o + p) for o, p in zip(offset, patch))
    cropped = condition(image[(slice(None),) + window], "patchddm", volume, offset)
    assert cropped.shape == (7, *patch)
    assert torch.equal(cropped, whole[(slice(None),) + window])
    for k in range(3):
        ramp = torch.linspace(-1, 1, volume[k])[offset[k]:offset[k] + patch[k]]
        view = [1, 1, 1]
        view[k] = patch[k]
        assert torch.equal(cropped[4 + k], ramp.reshape(view).expand(patch))
    assert condition(image, "fullres").shape == (4, *volume)
    assert torch.equal(condition(image, "halfres"), decimate(image * 2 - 1))


def test_decimate():
    x = torch.arange(2 * 8 * 6 * 5).reshape(2, 8, 6, 5)
    y = decimate(x)
    assert y.shape == (2, 4, 3, 3)
    assert torch.equal(y, x[:, ::2, ::2, ::2])
    assert decimate(np.zeros((1, 1, 9, 9, 9)), 3).shape == (1, 1, 3, 3, 3)


def test_pad_unpad_round_trip_odd_sizes():
    x = torch.randn(2, 15, 10, 7)
    padded, spec = pad_to_multiple(x, 4)
    assert padded.shape == (2, 16, 12, 8)
    assert spec == ((0, 1), (1, 1), (0, 1))  # extra voxel goes to the end
    assert torch.equal(unpad(padded, spec), x)
    assert padded.sum() == pytest.approx(x.sum().item(), rel=1e-5) and padded[:, -1].abs().sum() == 0
    # the paper's BraTS padding 240x240x155 -> 256^3 (tested on a cheap bool array)
    vol = np.ones((240, 240, 155), dtype=bool)
    big, spec = pad_to_shape(vol, 256)
    assert spec == ((8, 8), (8, 8), (50, 51)) and big.shape == (256, 256, 256) and big.sum() == vol.sum()
    assert np.array_equal(unpad(big, spec), vol)
    same, spec = pad_to_multiple(torch.ones(1, 8, 8, 8), (4, 8, 2))
    assert same.shape == (1, 8, 8, 8) and spec == ((0, 0),) * 3
    with pytest.raises(ValueError, match="smaller"):
        pad_to_shape(x, (8, 8, 8))


def test_network_input_puts_the_noisy_mask_last():
    n, shape = 2, (4, 4, 4)
    cond = condition(torch.rand(4, *shape), "patchddm")[None].expand(n, -1, -1, -1, -1)
    mask = torch.randn(n, 1, *shape)
    out = network_input(cond, mask)
    assert out.shape == (n, 8, *shape)
    assert torch.equal(out[:, :7], cond) and torch.equal(out[:, 7:], mask)


def test_padded_case_keeps_its_voxels_in_place():
    """pad_case moves the affine with the padding: padded voxel i + before is original voxel i."""
    from patchddm_fast.training.cases import pad_case

    affine = np.array([[0.0, 1.2, 0, 10], [1.0, 0, 0, -5], [0, 0, 0.8, 3], [0, 0, 0, 1]])
    case = pad_case("c", np.zeros((4, 6, 7, 8), np.float32), np.zeros((6, 7, 8), bool), 4, affine)
    before = np.array([1, 0, 0])  # 6 -> 8: (1, 1); 7 -> 8: (0, 1); 8 -> 8: (0, 0)
    voxel = np.array([2.0, 3.0, 4.0, 1.0])
    np.testing.assert_allclose(case.affine @ (voxel + np.r_[before, 0]), affine @ voxel)
    assert np.array_equal(pad_case("c", np.zeros((4, 8, 8, 8)), np.zeros((8, 8, 8)), 4).affine, np.eye(4))


def test_patches_method_is_patchddm_without_coordinates():
    """The ablation method "patches" trains on the same random patches as PatchDDM, but its
    network input has no coordinate channels (image + noisy mask only)."""
    from patchddm_fast.training.cases import BatchSampler, pad_case

    rng = np.random.default_rng(0)
    case = pad_case("c", rng.random((4, 16, 16, 16), dtype=np.float32), rng.random((16, 16, 16)) > 0.5, 8)
    assert get_method("patches").in_channels() == 5 and get_method("patchddm").in_channels() == 8
    with_coords = BatchSampler([case], "patchddm", patch_size=8).batch(np.random.default_rng(1), 2)
    without = BatchSampler([case], "patches", patch_size=8).batch(np.random.default_rng(1), 2)
    assert with_coords[0].shape == (2, 7, 8, 8, 8) and without[0].shape == (2, 4, 8, 8, 8)
    torch.testing.assert_close(without[0], with_coords[0][:, :4])  # same patches, same offsets
    torch.testing.assert_close(without[1], with_coords[1])
