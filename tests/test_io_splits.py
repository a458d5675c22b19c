"""Deterministic splits: seeded, from JSON, and the reference BraTS2020 split by name."""
import json

import numpy as np
import pytest

from patchddm_fast.data import DatasetError, load_split, make_split, named_split, resolve_split

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]


def _partition_ok(split, ids):
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(ids) and set().union(*parts) == set(ids)


def test_seeded_split_is_deterministic_and_order_free():
    a = make_split(IDS, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (295, 37, 37)
    _partition_ok(a, IDS)
    assert a == make_split(list(reversed(IDS)), seed=3)
    assert a != make_split(IDS, seed=4)
    small = make_split(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"], seed=0, val_fraction=0.2, test_fraction=0.3)
    assert (len(small.train), len(small.val), len(small.test)) == (5, 2, 3)
    with pytest.raises(ValueError):
        make_split(IDS, val_fraction=0.6, test_fraction=0.5)


def test_reference_brats2020_split():
    s = named_split("brats2020-reference")
    assert (len(s.train), len(s.val), len(s.test)) == (295, 37, 37)
    _partition_ok(s, IDS)
    # independent derivation of the reference procedure: a RandomState(0) permutation of 0..368, plus one
    perm = np.random.RandomState(0).permutation(369) + 1
    assert s.test == [f"BraTS20_Training_{n:03d}" for n in sorted(perm[332:])]
    assert s.val == [f"BraTS20_Training_{n:03d}" for n in sorted(perm[295:332])]
    # the reference's numbered folders ("000001") map to the same cases by number
    folders = named_split("brats2020-reference", [f"{i:06d}" for i in range(1, 370)])
    assert [int(c) for c in folders.test] == [int(c[-3:]) for c in s.test]
    # a partial download keeps each present case in its reference part
    part = named_split("brats2020-reference", IDS[:100])
    assert set(part.test) == set(s.test) & set(IDS[:100])
    with pytest.raises(DatasetError, match="no BraTS2020 training number"):
        named_split("brats2020-reference", ["BraTS20_Training_400"])
    with pytest.raises(ValueError, match="unknown split name"):
        named_split("brats2021", IDS)


def test_json_split_round_trip_and_errors(tmp_path):
    s = make_split(IDS[:20], seed=1)
    path = s.save(tmp_path / "split.json")
    assert load_split(path, IDS[:20]) == s
    assert resolve_split(str(path), IDS[:20]) == s
    assert resolve_split("brats2020-reference", IDS) == named_split("brats2020-reference", IDS)
    assert resolve_split(None, IDS, seed=2) == make_split(IDS, seed=2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["a", "b"], "validation": ["b"]}))
    with pytest.raises(DatasetError, match=r"bad.json: case b is in both 'train' and 'val'"):
        load_split(bad)
    bad.write_text(json.dumps({"train": ["a", "zz"]}))
    with pytest.raises(DatasetError, match=r"bad.json: 1 case\(s\) not in the dataset, e.g. \['zz'\]"):
        load_split(bad, ["a", "b"])
    bad.write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetError, match="unknown split keys"):
        load_split(bad)
    bad.write_text("[1, 2")
    with pytest.raises(DatasetError, match="cannot read split JSON"):
        load_split(bad)
    with pytest.raises(DatasetError, match="neither a known name"):
        resolve_split("nonsense", IDS)
