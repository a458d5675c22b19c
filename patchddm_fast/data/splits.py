"""Deterministic train / validation / test splits.

Three sources, one :class:`Split` type:

* ``make_split(case_ids, seed, val_fraction, test_fraction)`` -- sort the ids, shuffle them
  with ``numpy.random.default_rng(seed)``, take ``round(n*val)`` validation and
  ``round(n*test)`` test cases, the rest train.  Same ids + seed -> same split on any machine.
* ``load_split(path)`` -- a JSON file ``{"train": [...], "val": [...], "test": [...]}``
  (``"validation"`` accepted for ``"val"``).
* ``named_split("brats2020-reference", case_ids)`` -- the reference code's BraTS2020 split
  (295/37/37 of 369).  The paper does not list case ids.  The reference code
  (``make_split`` in its ``bratsloader.py``) shuffles the case numbers 1..369 with
  ``numpy.random.RandomState(0)`` and takes the first 295 for training, the next 37 for
  validation and the last 37 for testing, matching cases by the number in the folder name.
  We reproduce that procedure and map number N to ``BraTS20_Training_NNN`` (and to any case
  id ending in that number, e.g. the reference's ``000001`` folders).  That folder number N
  corresponds to ``BraTS20_Training_N`` is our assumption: the authors' preprocessed folders
  are not public.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.core.files import read_json_object
from patchddm_fast.data.nifti import PathLike

SPLIT_NAMES = ("brats2020-reference",)
_BRATS2020_TOTAL = 369
_BRATS2020_COUNTS = (295, 37, 37)


@dataclass(frozen=True)
class Split:
    train: List[str]
    val: List[str]
    test: List[str]

    def to_dict(self) -> Dict[str, List[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    def save(self, path: PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _check_disjoint(parts: Dict[str, Sequence[str]], where: str) -> None:
    seen: Dict[str, str] = {}
    for name, ids in parts.items():
        for cid in ids:
            if cid in seen:
                raise DatasetError(f"{where}: case {cid} is in both '{seen[cid]}' and '{name}'")
            seen[cid] = name


def make_split(case_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.1,
               test_fraction: float = 0.1) -> Split:
    """Seeded random split of ``case_ids`` (order of the input does not matter)."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test and val + test < 1; got val={val_fraction}, test={test_fraction}")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids must be unique")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val, n_test = round(len(ids) * val_fraction), round(len(ids) * test_fraction)
    shuffled = [ids[i] for i in order]
    val, test, train = shuffled[:n_val], shuffled[n_val:n_val + n_test], shuffled[n_val + n_test:]
    return Split(sorted(train), sorted(val), sorted(test))


def load_split(path: PathLike, case_ids: Sequence[str] | None = None) -> Split:
    """Read a split JSON; with ``case_ids``, every listed id must exist in the dataset."""
    path = Path(path)
    raw = read_json_object(path, "split JSON", "a JSON object with train/val/test lists")
    if "validation" in raw and "val" not in raw:
        raw["val"] = raw.pop("validation")
    unknown_keys = sorted(set(raw) - {"train", "val", "test"})
    if unknown_keys:
        raise DatasetError(f"{path}: unknown split keys {unknown_keys} (expected train, val, test)")
    parts = {k: [str(x) for x in raw.get(k, [])] for k in ("train", "val", "test")}
    _check_disjoint(parts, str(path))
    if case_ids is not None:
        missing = sorted(set().union(*parts.values()) - set(case_ids))
        if missing:
            raise DatasetError(f"{path}: {len(missing)} case(s) not in the dataset, e.g. {missing[:5]}")
    return Split(parts["train"], parts["val"], parts["test"])


def brats2020_reference_numbers() -> Dict[str, List[int]]:
    """Case numbers 1..369 of the reference split (see the module docstring)."""
    numbers = np.arange(1, _BRATS2020_TOTAL + 1)
    np.random.RandomState(0).shuffle(numbers)
    a, b = _BRATS2020_COUNTS[0], _BRATS2020_COUNTS[0] + _BRATS2020_COUNTS[1]
    return {"train": sorted(numbers[:a].tolist()), "val": sorted(numbers[a:b].tolist()),
            "test": sorted(numbers[b:].tolist())}


def _case_number(case_id: str) -> int | None:
    m = re.search(r"(\d+)$", case_id)
    return int(m.group(1)) if m else None


def named_split(name: str, case_ids: Sequence[str] | None = None) -> Split:
    """A split known by name.  Without ``case_ids`` the canonical ids are returned
    (``BraTS20_Training_001`` ...); with them, each dataset id is assigned by its trailing number."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split name {name!r}; known: {SPLIT_NAMES}")
    numbers = brats2020_reference_numbers()
    if case_ids is None:
        return Split(*[[f"BraTS20_Training_{n:03d}" for n in numbers[k]] for k in ("train", "val", "test")])
    where = {n: k for k, ns in numbers.items() for n in ns}
    parts: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    by_number: Dict[int, str] = {}
    for cid in sorted(case_ids):
        n = _case_number(cid)
        if n is None or n not in where:
            raise DatasetError(f"split {name}: case {cid} has no BraTS2020 training number 1..{_BRATS2020_TOTAL}")
        if n in by_number:
            raise DatasetError(f"split {name}: cases {by_number[n]} and {cid} share number {n}")
        by_number[n] = cid
        parts[where[n]].append(cid)
    return Split(parts["train"], parts["val"], parts["test"])


def resolve_split(spec: str | None, case_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> Split:
    """``spec``: a split name, a path to a JSON file, or None/"random" for a seeded split."""
    if spec in (None, "", "random"):
        return make_split(case_ids, seed, val_fraction, test_fraction)
    if spec in SPLIT_NAMES:
        return named_split(spec, case_ids)
    if Path(spec).suffix.lower() == ".json" or Path(spec).exists():
        return load_split(spec, case_ids)
    raise DatasetError(f"split {spec!r}: neither a known name {SPLIT_NAMES}, 'random', nor an existing JSON file")
