"""From a dataset folder to the trainer's cases, and the `patchddm preprocess` command."""
import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest

from patchddm_fast.cli import preprocess as preprocess_cmd
from patchddm_fast.data import PreprocessConfig, VolumeCache, load_case, open_dataset, preprocess_case
from synthetic_data import write_phantom_dataset
from patchddm_fast.data.training_sets import dataset_cases, preprocess_config_for

SHAPE = (20, 24, 16)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_src")
    write_phantom_dataset(root / "ds", 5, SHAPE)
    return root


def test_dataset_cases_follow_split_and_preprocessing(root, tmp_path):
    split = {"train": ["BraTS20_Training_001", "BraTS20_Training_003"], "val": ["BraTS20_Training_005"], "test": []}
    (tmp_path / "split.json").write_text(json.dumps(split))
    cfg = SimpleNamespace(data=str(root / "ds"), split=str(tmp_path / "split.json"), cache_dir=str(tmp_path / "c"),
                          out_dir=str(tmp_path / "run"), progress=False, seed=0)
    train, val = dataset_cases(cfg, 8)
    assert [c.case_id for c in train] == split["train"] and [c.case_id for c in val] == split["val"]
    ds = open_dataset(root / "ds")
    exp = preprocess_case(load_case(ds.case("BraTS20_Training_003")), PreprocessConfig(multiple=8))
    image, label = train[1].read()  # the trainer reads windows of the memory-mapped cache
    np.testing.assert_array_equal(image, exp.image)
    np.testing.assert_array_equal(label > 0, exp.label > 0)
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == split
    # the cache now holds exactly the 3 used cases
    assert len([p for p in (tmp_path / "c").iterdir()]) == 3


def test_preprocess_config_must_fit_the_network():
    assert preprocess_config_for(None, 16).multiple == 16
    assert preprocess_config_for({"multiple": 64}, 16).multiple == 64
    with pytest.raises(ValueError, match="not a multiple of the network's 16"):
        preprocess_config_for({"target_shape": [24, 24, 24]}, 16)


def test_preprocess_command_caches_and_writes_split(root, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    preprocess_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["preprocess", "--data", str(root / "ds"), "--cache", str(tmp_path / "c"), "--multiple",
                              "8", "--split", "random", "--val-fraction", "0.2", "--test-fraction", "0.2",
                              "--split-out", str(tmp_path / "s.json"), "--benchmark", "3", "--patch-size", "8",
                              "--quiet"])
    assert preprocess_cmd.run(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["preprocess"]["multiple"] == 8
    split = json.loads((tmp_path / "s.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [3, 1, 1]
    vols = VolumeCache(tmp_path / "c").build(open_dataset(root / "ds"), PreprocessConfig(multiple=8), progress=False)
    assert len(vols) == 5 and len(list((tmp_path / "c").iterdir())) == 5  # all hits, nothing new
