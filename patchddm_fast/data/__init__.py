"""Data: built-in phantoms, the patch data path, and real data in: NIfTI datasets, validation,
preprocessing, cache, splits, BraTS label conventions and regions.

Typical use::

    from patchddm_fast.data import open_dataset, PreprocessConfig, VolumeCache, CachedVolumeDataset
    ds = open_dataset("MICCAI_BraTS2020_TrainingData")      # layout detected
    vols = VolumeCache("cache").build(ds, PreprocessConfig())  # validates + caches every case
    train = CachedVolumeDataset(vols, patch_size=128)          # (image, label, origin) items

Every problem with the user's files raises :class:`DatasetError` naming the file.  The
modality names (t1, t1ce, t2, flair) live in :data:`~patchddm_fast.data.layouts.MODALITIES`.

Layer 1: may import core (and numpy, torch, nibabel, scipy); never the model, diffusion,
eval, training, sampling, analysis or the CLI -- how the network is conditioned on these
arrays is :mod:`patchddm_fast.model.conditioning`'s.
"""
from patchddm_fast.data.patches import (
    OFFSET_DISTRIBUTIONS,
    PatchOffsetSampler,
    decimate,
    pad_to_multiple,
    pad_to_shape,
    trapezoid_split,
    unpad,
)
from patchddm_fast.data.phantom import PhantomCase, case_seed, make_phantom, make_phantom_dataset
from patchddm_fast.data.cache import CachedVolume, VolumeCache, cache_key, default_cache_dir
from patchddm_fast.data.dataset import CachedVolumeDataset, measure_throughput
from patchddm_fast.core.errors import DatasetError
from patchddm_fast.data.layouts import (
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
from patchddm_fast.data.nifti import load_volume, save_like
from patchddm_fast.data.preprocess import CropPadBox, PreprocessConfig, PreprocessedCase, compute_box, preprocess_case
from patchddm_fast.data.splits import Split, load_split, make_split, named_split, resolve_split
from patchddm_fast.data.volumes import LoadedCase, load_case

__all__ = [
    "BRATS2023_REGIONS",
    "BRATS_REGIONS",
    "CachedVolume",
    "CachedVolumeDataset",
    "Case",
    "CropPadBox",
    "DatasetError",
    "LAYOUTS",
    "LoadedCase",
    "MODALITIES",
    "NiftiDataset",
    "OFFSET_DISTRIBUTIONS",
    "PatchOffsetSampler",
    "PhantomCase",
    "PreprocessConfig",
    "PreprocessedCase",
    "Split",
    "VolumeCache",
    "cache_key",
    "case_from_files",
    "case_seed",
    "compute_box",
    "decimate",
    "default_cache_dir",
    "label_files",
    "load_case",
    "load_split",
    "load_volume",
    "make_phantom",
    "make_phantom_dataset",
    "make_split",
    "measure_throughput",
    "named_split",
    "open_dataset",
    "pad_to_multiple",
    "pad_to_shape",
    "preprocess_case",
    "resolve_split",
    "save_like",
    "trapezoid_split",
    "unpad",
]
