"""Normalisation against a float64 reference, and exact round trips original grid -> network grid -> original."""
import json

import nibabel as nib
import numpy as np
import pytest

from patchddm_fast.data import CropPadBox, PreprocessConfig, compute_box, load_case, open_dataset, preprocess_case, save_like
from patchddm_fast.data.preprocess import normalise_intensities
from synthetic_data import write_phantom_dataset

SHAPE = (20, 24, 16)


def reference_normalise(channel: np.ndarray, brain: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Independent float64 version: percentiles by sorting + linear interpolation (numpy's default rule)."""
    v = np.sort(channel[brain].astype(np.float64))

    def pct(p):
        pos = p / 100.0 * (v.size - 1)
        i = int(np.floor(pos))
        j = min(i + 1, v.size - 1)
        return v[i] + (v[j] - v[i]) * (pos - i)

    lo, hi = pct(lower), pct(upper)
    out = np.zeros(channel.shape, np.float64)
    out[brain] = (np.minimum(np.maximum(channel[brain], lo), hi) - lo) / (hi - lo)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    write_phantom_dataset(root, 1, SHAPE)
    return open_dataset(root)


@pytest.mark.parametrize("lower,upper", [(0.5, 99.5), (1.0, 99.0), (0.0, 100.0)])
def test_normalisation_matches_float64_reference(lower, upper):
    rng = np.random.default_rng(1)
    img = rng.gamma(2.0, 300.0, size=(4, 9, 10, 11)).astype(np.float32)
    img[:, :2] = 0  # background: zero in every modality
    img[1, 5, 5, 5] = 0  # a zero voxel inside the brain (nonzero in other channels) stays in the brain
    out = normalise_intensities(img, lower, upper)
    brain = np.any(img != 0, axis=0)
    for c in range(4):
        np.testing.assert_allclose(out[c], reference_normalise(img[c], brain, lower, upper), atol=2e-7)
    assert out.dtype == np.float32 and np.all(out[:, ~brain] == 0)
    assert out[:, brain].min() == 0.0 and out[:, brain].max() == 1.0


def test_box_reproduces_the_paper_padding():
    box = compute_box((240, 240, 155), PreprocessConfig())
    assert box.target_shape == (256, 256, 256)
    after = [t - n - o for t, n, o in zip(box.target_shape, box.original_shape, box.offset)]
    assert list(box.offset) == [8, 8, 50] and after == [8, 8, 51]
    assert compute_box((240, 240, 155), PreprocessConfig(cube=False)).target_shape == (256, 256, 192)
    assert compute_box((20, 24, 16), PreprocessConfig(multiple=8)).target_shape == (24, 24, 24)


@pytest.mark.parametrize("target", [(24, 32, 16), (16, 20, 12), (20, 24, 16)])
def test_box_round_trip_pad_and_crop(target):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2,) + SHAPE).astype(np.float32)
    fg = np.zeros(SHAPE, bool)
    fg[3:9, 15:22, 2:8] = True
    box = compute_box(SHAPE, PreprocessConfig(target_shape=target), fg)
    y = box.apply(x)
    assert y.shape == (2,) + target
    back = box.invert(y)
    # voxels kept by the box come back exactly; cropped ones are 0
    kept = box.invert(np.ones(target, np.float32)).astype(bool)
    np.testing.assert_array_equal(back[:, kept], x[:, kept])
    assert np.all(back[:, ~kept] == 0)
    assert kept[fg].all(), "a crop must keep the foreground when it fits"
    assert CropPadBox.from_dict(json.loads(json.dumps(box.to_dict()))) == box


def test_config_validation_and_serialisation():
    cfg = PreprocessConfig(lower_percentile=1, upper_percentile=99, target_shape=[32, 32, 32], label_mode="multiclass")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="percentiles"):
        PreprocessConfig(lower_percentile=50, upper_percentile=10)
    with pytest.raises(ValueError, match="label_mode"):
        PreprocessConfig(label_mode="regions")
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({"percentile": 1})


def test_label_modes(dataset):
    lc = load_case(dataset.cases[0], label_values=dataset.label_values)
    binary = preprocess_case(lc, PreprocessConfig(multiple=8))
    multi = preprocess_case(lc, PreprocessConfig(multiple=8, label_mode="multiclass"))
    np.testing.assert_array_equal(binary.label, (multi.label > 0).astype(np.uint8))
    assert set(np.unique(multi.label)) == set(np.unique(lc.label)) and set(np.unique(binary.label)) == {0, 1}


def test_nifti_round_trip_keeps_grid_and_header(dataset, tmp_path):
    """preprocess -> network grid -> invert -> save_like gives the input's exact grid and header."""
    case = dataset.cases[0]
    lc = load_case(case, label_values=dataset.label_values)
    cfg = PreprocessConfig(multiple=8)
    pre = preprocess_case(lc, cfg)
    assert pre.image.shape == (4, 24, 24, 24) and pre.box.original_shape == SHAPE
    flair_back = pre.box.invert(pre.image[3])
    brain = np.any(lc.image != 0, axis=0)
    np.testing.assert_allclose(flair_back, reference_normalise(lc.image[3], brain, 0.5, 99.5), atol=2e-7)
    np.testing.assert_array_equal(pre.box.invert(pre.label), (lc.label > 0).astype(np.uint8))

    out = save_like(flair_back, lc.reference, tmp_path / "flair_back.nii.gz", np.float32)
    src, got = nib.load(case.images[3]), nib.load(out)
    assert got.shape == src.shape == SHAPE
    np.testing.assert_array_equal(got.affine, src.affine)
    assert got.header.get_zooms() == src.header.get_zooms()
    np.testing.assert_allclose(got.header.get_zooms(), (1.0, 1.0, 1.5), rtol=1e-6)
    for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z", "xyzt_units"):
        np.testing.assert_array_equal(got.header[key], src.header[key], err_msg=key)
    assert got.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(got.dataobj), flair_back)
    assert abs(src.affine[0, 1]) > 0.1, "the test affine must be oblique"
