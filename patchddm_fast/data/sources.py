"""Where training cases come from: built-in phantoms or a dataset folder on disk."""
from __future__ import annotations

from typing import List, Tuple

from patchddm_fast.data.cases import VolumeCase, pad_case

# Validation phantoms are drawn from a seed stream far from the training ones, so the
# two sets never share a case.
VALIDATION_SEED_OFFSET = 1_000_003


def phantom_cases(n: int, size: int, seed: int, multiple: int, **options) -> List[VolumeCase]:
    from patchddm_fast.data.phantom import make_phantom_dataset

    return [pad_case(c.case_id, c.image, c.label, multiple) for c in make_phantom_dataset(n, size, seed, **options)]


def load_cases(config, multiple: int) -> Tuple[List[VolumeCase], List[VolumeCase]]:
    """(train, validation) cases for a TrainConfig, padded to ``multiple``."""
    if config.data == "phantom":
        options = dict(getattr(config, "phantom_options", None) or {})
        train = phantom_cases(config.phantom_train, config.phantom_size, config.seed, multiple, **options)
        val = phantom_cases(config.phantom_val, config.phantom_size, config.seed + VALIDATION_SEED_OFFSET, multiple,
                            **options)
        return train, val
    from patchddm_fast.io.training import dataset_cases

    return dataset_cases(config, multiple)
