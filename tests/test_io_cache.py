"""The memory-mapped volume cache and the Dataset reading patches from it."""
import os
import pickle

import numpy as np
import pytest
import torch

import patchddm_fast.data.cache as cache_mod
from patchddm_fast.data import (BRATS_REGIONS, CachedVolumeDataset, PreprocessConfig, VolumeCache, load_case,
                              measure_throughput, open_dataset, preprocess_case)
from synthetic_data import write_phantom_dataset

SHAPE = (20, 24, 16)
CFG = PreprocessConfig(multiple=8, label_mode="multiclass")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_src")
    write_phantom_dataset(root, 2, SHAPE)
    return open_dataset(root)


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    cache = VolumeCache(tmp_path_factory.mktemp("cache"))
    return cache, cache.build(dataset, CFG, progress=False)


def _expected(dataset, i):
    return preprocess_case(load_case(dataset.cases[i], label_values=dataset.label_values), CFG)


def test_cached_volume_equals_in_memory_preprocessing(dataset, built):
    _, vols = built
    for i, vol in enumerate(vols):
        exp = _expected(dataset, i)
        assert isinstance(vol.image, np.memmap) and vol.shape == (24, 24, 24)
        assert vol.box == exp.box and vol.case_id == dataset.cases[i].case_id
        image, label = vol.read()
        np.testing.assert_array_equal(image, exp.image)
        np.testing.assert_array_equal(label, exp.label)
        # only the nonzero bounding box is stored
        assert np.prod(vol.image.shape[1:]) < np.prod(vol.shape)


def test_network_grid_affine_places_every_voxel_where_the_scan_has_it(dataset, built):
    """A cached volume's affine is the source's moved by the crop/pad box: network voxel
    ``o + offset`` lies where original voxel ``o`` lies (what `sample` writes its NIfTI with)."""
    _, vols = built
    for i, vol in enumerate(vols):
        source = load_case(dataset.cases[i], label_values=dataset.label_values).reference.affine
        original = np.array([[0, 0, 0], [3, 5, 2], [19, 23, 15]], dtype=np.float64)
        network = original + np.asarray(vol.box.offset)
        homogeneous = lambda v: np.c_[v, np.ones(len(v))].T  # noqa: E731
        np.testing.assert_allclose(vol.affine @ homogeneous(network), source @ homogeneous(original), atol=1e-9)


@pytest.mark.parametrize("origin,size", [((0, 0, 0), (8, 8, 8)), ((16, 16, 16), (8, 8, 8)), ((3, 5, 7), (16, 8, 12)),
                                         ((-4, 20, 2), (8, 8, 8))])
def test_windows_equal_slices_of_the_full_volume(dataset, built, origin, size):
    vol = built[1][0]
    exp = _expected(dataset, 0)
    pad = 8  # also windows partly outside the grid read zeros there
    full_img = np.pad(exp.image, [(0, 0)] + [(pad, pad)] * 3)
    full_lab = np.pad(exp.label, [(pad, pad)] * 3)
    sl = tuple(slice(o + pad, o + pad + s) for o, s in zip(origin, size))
    image, label = vol.read(origin, size)
    np.testing.assert_array_equal(image, full_img[(slice(None), *sl)])
    np.testing.assert_array_equal(label, full_lab[sl])


def test_pickles_as_a_reference_not_a_copy(built):
    vol = built[1][0]
    blob = pickle.dumps(vol)
    assert len(blob) < 10_000 < vol.image.nbytes
    clone = pickle.loads(blob)
    assert isinstance(clone.image, np.memmap)
    for a, b in zip(clone.read((2, 3, 4), (8, 8, 8)), vol.read((2, 3, 4), (8, 8, 8))):
        np.testing.assert_array_equal(a, b)


def test_second_get_is_a_cache_hit(dataset, built, monkeypatch):
    cache, vols = built
    monkeypatch.setattr(cache_mod, "load_case", lambda *a, **k: pytest.fail("cache miss: source files were read"))
    again = cache.get(dataset.cases[0], CFG, label_values=dataset.label_values)
    assert again.path == vols[0].path


def test_key_changes_with_source_and_params(dataset, tmp_path):
    case = dataset.cases[0]
    k = cache_mod.cache_key(case, CFG, label_values=dataset.label_values)
    assert k == cache_mod.cache_key(case, CFG, label_values=dataset.label_values)
    assert k != cache_mod.cache_key(case, PreprocessConfig(multiple=8), label_values=dataset.label_values)
    assert k != cache_mod.cache_key(case, CFG, label_values=dataset.label_values, already_normalised=True)
    st = os.stat(case.images[0])
    os.utime(case.images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert k != cache_mod.cache_key(case, CFG, label_values=dataset.label_values)
    finally:
        os.utime(case.images[0], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_interrupted_write_leaves_no_entry(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = np.save

    def failing_save(path, arr):
        calls["n"] += 1
        if calls["n"] == 2:  # image written, then the label write dies
            raise OSError("disk full")
        real_save(path, arr)

    monkeypatch.setattr(cache_mod.np, "save", failing_save)
    cache = VolumeCache(tmp_path / "c")
    with pytest.raises(OSError, match="disk full"):
        cache.get(dataset.cases[0], CFG)
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.setattr(cache_mod.np, "save", real_save)
    vol = cache.get(dataset.cases[0], CFG)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [vol.path.name]


def test_parallel_build_matches_serial(dataset, built, tmp_path):
    vols = VolumeCache(tmp_path / "p").build(dataset, CFG, workers=2, progress=False)
    for a, b in zip(vols, built[1]):
        np.testing.assert_array_equal(a.read()[0], b.read()[0])


def test_dataset_whole_volumes_and_regions(built):
    vols = built[1]
    ds = CachedVolumeDataset(vols)
    image, label, origin = ds[0]
    assert image.shape == (4, 24, 24, 24) and image.dtype == torch.float32
    assert label.shape == (1, 24, 24, 24) and origin.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(label[0].numpy(), vols[0].read()[1] > 0)
    regions = CachedVolumeDataset(vols, regions=list(BRATS_REGIONS.values()))
    _, lab3, _ = regions[0]
    raw = vols[0].read()[1]
    for k, values in enumerate(BRATS_REGIONS.values()):
        np.testing.assert_array_equal(lab3[k].numpy(), np.isin(raw, values))


def test_dataset_patches_follow_the_sampler(built):
    from patchddm_fast.data.patches import PatchOffsetSampler

    vols = built[1]
    ds = CachedVolumeDataset(vols, patch_size=8)
    image, label, origin = ds.sample(1, np.random.default_rng(5))
    expected_origin = PatchOffsetSampler((24, 24, 24), (8, 8, 8)).sample(np.random.default_rng(5))
    assert tuple(origin.tolist()) == expected_origin
    full_img, full_lab = vols[1].read()
    sl = tuple(slice(o, o + 8) for o in expected_origin)
    np.testing.assert_array_equal(image.numpy(), full_img[(slice(None), *sl)])
    np.testing.assert_array_equal(label[0].numpy(), full_lab[sl] > 0)
    torch.manual_seed(0)
    a = ds[0][2]
    torch.manual_seed(0)
    assert torch.equal(a, ds[0][2])  # reproducible from torch's seed
    stats = measure_throughput(ds, n_items=4)
    assert stats["items_per_s"] > 0 and stats["items"] == 4
