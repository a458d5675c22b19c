"""Every bad input is refused before training, with a DatasetError naming the file and the problem."""
import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from patchddm_fast.data import DatasetError, PreprocessConfig, VolumeCache, load_case, open_dataset, preprocess_case
from synthetic_data import oblique_affine, save_volume, write_phantom_dataset

SHAPE = (12, 14, 10)
CID = "BraTS20_Training_001"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    write_phantom_dataset(root / "brats", 1, SHAPE)
    write_phantom_dataset(root / "pre", 1, SHAPE, layout="patchddm-preprocessed")
    return root


@pytest.fixture
def case_dir(tmp_path, source):
    shutil.copytree(source / "brats", tmp_path / "ds")
    return tmp_path / "ds"


def _file(root, m):
    return root / CID / f"{CID}_{m}.nii.gz"


def _load(root):
    ds = open_dataset(root)
    return load_case(ds.cases[0], label_values=ds.label_values)


def _replace(root, m, data, affine=None):
    save_volume(data, oblique_affine() if affine is None else affine, _file(root, m))


def _error(root):
    with pytest.raises(DatasetError) as e:
        _load(root)
    return str(e.value)


def test_valid_case_loads(case_dir):
    lc = _load(case_dir)
    assert lc.image.shape == (4,) + SHAPE and lc.image.dtype == np.float32
    assert lc.label.dtype == np.uint8 and set(np.unique(lc.label)) <= {0, 1, 2, 4}
    np.testing.assert_allclose(lc.zooms, (1.0, 1.0, 1.5), rtol=1e-6)


def test_shape_mismatch(case_dir):
    _replace(case_dir, "t2", np.ones((12, 14, 11), np.int16))
    msg = _error(case_dir)
    assert f"{CID}_t2.nii.gz" in msg and "shape (12, 14, 11) differs" in msg and f"{CID}_t1.nii.gz" in msg


def test_affine_mismatch_beyond_tolerance_only(case_dir):
    data = np.asarray(nib.load(_file(case_dir, "flair")).dataobj)
    nudged = oblique_affine()
    nudged[0, 3] += 1e-5  # float noise of converters: accepted
    _replace(case_dir, "flair", data, nudged)
    _load(case_dir)
    shifted = oblique_affine()
    shifted[1, 3] += 0.5  # half a voxel: a different grid
    _replace(case_dir, "flair", data, shifted)
    msg = _error(case_dir)
    assert f"{CID}_flair.nii.gz" in msg and "affine differs" in msg and "0.5" in msg


def test_label_on_other_grid(case_dir):
    lab = np.asarray(nib.load(_file(case_dir, "seg")).dataobj)
    _replace(case_dir, "seg", lab, oblique_affine(zooms=(1, 1, 1)))
    msg = _error(case_dir)
    assert f"{CID}_seg.nii.gz" in msg and "affine differs" in msg


def test_non_finite_values(case_dir):
    data = np.asarray(nib.load(_file(case_dir, "t1ce")).dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    data[0, 0, 0] = np.inf
    _replace(case_dir, "t1ce", data)
    msg = _error(case_dir)
    assert f"{CID}_t1ce.nii.gz" in msg and "2 non-finite" in msg


def test_unexpected_and_non_integer_label_values(case_dir):
    lab = np.asarray(nib.load(_file(case_dir, "seg")).dataobj).astype(np.uint8)
    lab[0, 0, 0] = 3  # BraTS 2023's ET value in a BraTS 2020 dataset
    _replace(case_dir, "seg", lab)
    msg = _error(case_dir)
    assert f"{CID}_seg.nii.gz" in msg and "unexpected label values [3]" in msg and "[0, 1, 2, 4]" in msg
    frac = lab.astype(np.float32)
    frac[0, 0, 0] = 0.5
    _replace(case_dir, "seg", frac)
    assert "label values must be integers" in _error(case_dir)


def test_missing_modality_file(case_dir):
    ds = open_dataset(case_dir)
    _file(case_dir, "t2").unlink()
    with pytest.raises(DatasetError, match=f"{CID}_t2.nii.gz: file does not exist"):
        load_case(ds.cases[0])
    with pytest.raises(DatasetError, match="missing modality 't2'"):
        open_dataset(case_dir)


def test_truncated_gzip(case_dir):
    path = _file(case_dir, "flair")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])  # header intact, data cut off
    msg = _error(case_dir)
    assert f"{CID}_flair.nii.gz" in msg and "truncated or corrupt" in msg


@pytest.mark.parametrize("damage", ["last 4 bytes cut", "one bit flipped in the data"])
def test_damage_nibabel_would_read_silently(case_dir, damage):
    """nibabel stops reading where the header's voxels end: the gzip trailer (CRC-32, length)
    must be checked too, or damaged files become silently wrong voxels."""
    path = _file(case_dir, "t1ce")
    raw = bytearray(path.read_bytes())
    if damage == "last 4 bytes cut":
        raw = raw[:-4]
    else:
        raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    msg = _error(case_dir)
    assert f"{CID}_t1ce.nii.gz" in msg and "truncated or corrupt" in msg


def test_corrupt_file(case_dir):
    _file(case_dir, "t1").write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    msg = _error(case_dir)
    assert f"{CID}_t1.nii.gz" in msg and "not a readable NIfTI" in msg
    _file(case_dir, "t1").write_bytes(b"\x1f\x8b garbage that is not even gzip")
    assert "not a readable NIfTI" in _error(case_dir)


def test_4d_file_where_3d_expected(case_dir):
    _replace(case_dir, "t2", np.ones(SHAPE + (2,), np.int16))
    msg = _error(case_dir)
    assert f"{CID}_t2.nii.gz" in msg and "expected a 3D volume" in msg and "(12, 14, 10, 2)" in msg
    _replace(case_dir, "t2", np.ones(SHAPE + (1,), np.int16))  # trailing singleton axis is accepted
    assert _load(case_dir).image.shape == (4,) + SHAPE


def test_constant_modality_cannot_be_normalised(case_dir):
    brain = np.asarray(nib.load(_file(case_dir, "t1")).dataobj) != 0
    _replace(case_dir, "t1ce", (brain * 7).astype(np.int16))
    with pytest.raises(DatasetError, match=f"{CID}_t1ce.nii.gz: intensity is constant"):
        preprocess_case(_load(case_dir), PreprocessConfig(multiple=8))


def test_preprocessed_layout_must_be_in_unit_range(tmp_path, source):
    root = tmp_path / "pre"
    shutil.copytree(source / "pre", root)
    flair = root / "000001" / "brats_train_001_flair_000_w.nii.gz"
    save_volume(np.asarray(nib.load(flair).dataobj) * 300, oblique_affine(), flair)
    ds = open_dataset(root)
    with pytest.raises(DatasetError, match=r"brats_train_001_flair_000_w.nii.gz: intensities span \[0, 3"):
        preprocess_case(load_case(ds.cases[0]), PreprocessConfig(multiple=8), ds.preprocessed)


def test_cache_build_fails_before_writing_anything(case_dir, tmp_path):
    path = _file(case_dir, "t2")
    raw = path.read_bytes()
    path.write_bytes(raw[:200])
    cache = VolumeCache(tmp_path / "cache")
    with pytest.raises(DatasetError, match="t2.nii.gz"):
        cache.build(open_dataset(case_dir), PreprocessConfig(multiple=8), progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
