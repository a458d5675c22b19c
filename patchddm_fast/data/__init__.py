"""Data: synthetic BraTS-like phantoms and the PatchDDM patch/coordinate data path."""
from patchddm_fast.data.patches import (
    OFFSET_DISTRIBUTIONS,
    PatchOffsetSampler,
    build_model_input,
    coordinate_channels,
    crop,
    decimate,
    pad_to_multiple,
    pad_to_shape,
    trapezoid_split,
    unpad,
)
from patchddm_fast.data.phantom import CHANNELS, PhantomCase, case_seed, make_phantom, make_phantom_dataset

__all__ = [
    "CHANNELS",
    "OFFSET_DISTRIBUTIONS",
    "PatchOffsetSampler",
    "PhantomCase",
    "build_model_input",
    "case_seed",
    "coordinate_channels",
    "crop",
    "decimate",
    "make_phantom",
    "make_phantom_dataset",
    "pad_to_multiple",
    "pad_to_shape",
    "trapezoid_split",
    "unpad",
]
