"""Where training cases come from: built-in phantoms or a dataset folder on disk."""
from __future__ import annotations

from typing import List, Tuple

from patchddm_fast.data.layouts import open_dataset
from patchddm_fast.data.phantom import make_phantom_dataset
from patchddm_fast.data.regions import detect_convention
from patchddm_fast.data.training_sets import dataset_cases
from patchddm_fast.training.cases import VolumeCase, pad_case

# Validation phantoms are drawn from a seed stream far from the training ones, so the
# two sets never share a case.
VALIDATION_SEED_OFFSET = 1_000_003


def phantom_cases(n: int, size: int, seed: int, multiple: int, **options) -> List[VolumeCase]:
    return [pad_case(c.case_id, c.image, c.labels, multiple, c.affine)
            for c in make_phantom_dataset(n, size, seed, **options)]


def label_convention(config) -> str:
    """The label convention of a run's training data: phantoms carry BraTS 2020 labels
    (0/1/2/4); a dataset folder's layout says which values its labels use."""
    if config.data == "phantom":
        return "brats2020"
    dataset = open_dataset(config.data, layout=getattr(config, "layout", "auto"))
    if dataset.label_values is None:
        raise ValueError(f"{config.data}: the dataset does not declare its label values, so the label convention "
                         f"(binary, brats2020 or brats2023) cannot be detected")
    return detect_convention(dataset.label_values, source=str(config.data))


def load_cases(config, multiple: int) -> Tuple[List[VolumeCase], List[VolumeCase]]:
    """(train, validation) cases for a TrainConfig, padded to ``multiple``."""
    if config.data == "phantom":
        options = dict(getattr(config, "phantom_options", None) or {})
        train = phantom_cases(config.phantom_train, config.phantom_size, config.seed, multiple, **options)
        val = phantom_cases(config.phantom_val, config.phantom_size, config.seed + VALIDATION_SEED_OFFSET, multiple,
                            **options)
        return train, val
    return dataset_cases(config, multiple)
