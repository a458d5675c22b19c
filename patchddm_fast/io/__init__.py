"""Real data in, real results out: NIfTI datasets, validation, preprocessing, cache and splits.

Typical use::

    from patchddm_fast.io import open_dataset, PreprocessConfig, VolumeCache, CachedVolumeDataset
    ds = open_dataset("MICCAI_BraTS2020_TrainingData")      # layout detected
    vols = VolumeCache("cache").build(ds, PreprocessConfig())  # validates + caches every case
    train = CachedVolumeDataset(vols, patch_size=128)          # (image, label, origin) items

Every problem with the user's files raises :class:`DatasetError` naming the file.
"""
from patchddm_fast.io.cache import CachedVolume, VolumeCache, cache_key, default_cache_dir
from patchddm_fast.io.dataset import CachedVolumeDataset, measure_throughput
from patchddm_fast.io.errors import DatasetError
from patchddm_fast.io.layouts import (
    BRATS2023_REGIONS,
    BRATS_REGIONS,
    LAYOUTS,
    MODALITIES,
    Case,
    NiftiDataset,
    case_from_files,
    label_files,
    open_dataset,
)
from patchddm_fast.io.nifti import load_volume, save_like
from patchddm_fast.io.preprocess import CropPadBox, PreprocessConfig, PreprocessedCase, compute_box, preprocess_case
from patchddm_fast.io.splits import Split, load_split, make_split, named_split, resolve_split
from patchddm_fast.io.volumes import LoadedCase, load_case

__all__ = [
    "BRATS2023_REGIONS", "BRATS_REGIONS", "LAYOUTS", "MODALITIES", "CachedVolume", "CachedVolumeDataset", "Case",
    "CropPadBox", "DatasetError", "LoadedCase", "NiftiDataset", "PreprocessConfig", "PreprocessedCase", "Split",
    "VolumeCache", "cache_key", "case_from_files", "compute_box", "default_cache_dir", "label_files", "load_case",
    "load_split", "load_volume", "make_split", "measure_throughput", "named_split", "open_dataset",
    "preprocess_case", "resolve_split", "save_like",
]
