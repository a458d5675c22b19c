"""core/files: atomic writes leave the old file or the new one, never half, and no temp file behind."""
import os

import nibabel as nib
import numpy as np
import pytest

from patchddm_fast.core.errors import DatasetError
from patchddm_fast.core.files import (atomic_path, atomic_write_bytes, atomic_write_text, read_json_object,
                                      remove_stale_temp_files)
from patchddm_fast.data.nifti import save_volume


def test_a_failed_write_keeps_the_previous_file_and_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_bytes(target, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "old" and sorted(os.listdir(target.parent)) == ["metrics.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(target.parent)) == ["metrics.json"]


def test_a_killed_writer_s_temp_file_is_recognised_and_others_are_kept(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "last.pt") as tmp:
            tmp.write_bytes(b"x")
            os.link(tmp, tmp_path / (tmp.name + "-survivor"))  # what a SIGKILL would leave: the temp file
            raise KeyboardInterrupt
    stale = tmp_path / ".last.pt.k3j2h1ab.tmp"
    stale.write_bytes(b"x")
    (tmp_path / "notes.tmp").write_text("mine")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert (tmp_path / "notes.tmp").exists()


def test_nifti_is_written_through_a_temp_name_with_its_suffix(tmp_path):
    affine = np.diag([1.2, 1.0, 0.8, 1.0])
    path = save_volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), affine, tmp_path / "x.nii.gz")
    img = nib.load(path)
    assert np.array_equal(np.asarray(img.dataobj), np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)  # NIfTI stores float32
    assert os.listdir(tmp_path) == ["x.nii.gz"]


def test_json_object_errors_name_the_file(tmp_path):
    path = tmp_path / "split.json"
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="split.json: split JSON must be a JSON object"):
        read_json_object(path, "split JSON")
    path.write_text("{")
    with pytest.raises(DatasetError, match="cannot read split JSON"):
        read_json_object(path, "split JSON")
    path.write_text('{"train": []}')
    assert read_json_object(path, "split JSON") == {"train": []}
