"""The bridge from a dataset folder to the trainer's in-memory cases.

``dataset_cases(config, multiple)`` is what :func:`patchddm_fast.training.sources.load_cases`
calls when ``config.data`` is a folder.  It detects the layout, validates and caches
every case of the train and validation splits *before* training starts (so a corrupt
file fails in seconds, not hours in), and returns memory-mapped cached volumes, which
the trainer reads one patch window at a time.

Optional config attributes read here (defaults in brackets): ``layout`` ["auto"],
``split`` [None: seeded random 80/10/10 with ``config.seed``; a split name such as
"brats2020-reference" or a JSON file], ``val_fraction`` [0.1], ``test_fraction`` [0.1],
``cache_dir`` [``$PATCHDDM_CACHE`` or ``~/.cache/patchddm_fast/volumes``],
``preprocess`` [{} -> :class:`PreprocessConfig` defaults, with ``multiple`` = the network's],
``preprocess_workers`` [1].  The split used is written to ``<out_dir>/split.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from patchddm_fast.data.cache import CachedVolume, VolumeCache
from patchddm_fast.data.layouts import open_dataset
from patchddm_fast.data.preprocess import PreprocessConfig
from patchddm_fast.data.splits import Split, resolve_split


def preprocess_config_for(params: Optional[Dict[str, Any]], multiple: int) -> PreprocessConfig:
    """The run's PreprocessConfig from its ``preprocess`` dict (missing keys: defaults, with
    ``multiple`` = the network's); its grid must be a multiple of the network's ``multiple``."""
    pre = PreprocessConfig.from_dict({"multiple": multiple, **(params or {})})
    if pre.target_shape is not None and any(s % multiple for s in pre.target_shape):
        raise ValueError(f"preprocess target_shape {pre.target_shape} is not a multiple of the network's {multiple}")
    if pre.multiple % multiple:
        raise ValueError(f"preprocess multiple {pre.multiple} is not a multiple of the network's {multiple}")
    return pre


def dataset_split(config: Any) -> Tuple[Any, Split]:
    dataset = open_dataset(config.data, layout=getattr(config, "layout", "auto"))
    split = resolve_split(getattr(config, "split", None), dataset.case_ids, seed=int(getattr(config, "seed", 0)),
                          val_fraction=float(getattr(config, "val_fraction", 0.1)),
                          test_fraction=float(getattr(config, "test_fraction", 0.1)))
    return dataset, split


def dataset_cases(config: Any, multiple: int) -> Tuple[List[CachedVolume], List[CachedVolume]]:
    """(train, validation) cached volumes of the folder ``config.data`` (see the module docstring)."""
    dataset, split = dataset_split(config)
    if not split.train:
        raise ValueError(f"{config.data}: the split has no training cases")
    params = dict(getattr(config, "preprocess", None) or {})
    if getattr(config, "target", "binary") == "regions":
        params["label_mode"] = "multiclass"  # WT/TC/ET need the label values, not their union
    pre = preprocess_config_for(params, multiple)
    cache = VolumeCache(getattr(config, "cache_dir", None))
    progress = bool(getattr(config, "progress", True))
    workers = int(getattr(config, "preprocess_workers", 1))
    out_dir = getattr(config, "out_dir", None)
    if out_dir:
        split.save(Path(out_dir) / "split.json")

    def cases(ids: List[str]) -> list:
        # Memory-mapped cached volumes: the trainer reads one patch window per step.
        return list(cache.build(dataset, pre, cases=ids, workers=workers, progress=progress)) if ids else []

    return cases(split.train), cases(split.val)


__all__ = ["dataset_cases", "dataset_split", "preprocess_config_for"]
