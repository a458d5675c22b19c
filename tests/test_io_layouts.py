"""Dataset layout detection: BraTS 2020/2023, nnU-Net raw, the reference preprocessed layout."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from patchddm_fast.data import DatasetError, case_from_files, label_files, open_dataset
from patchddm_fast.data.layouts import MODALITIES, PREDICTION_MARKER, PREPROCESSED_MARKER
from synthetic_data import NNUNET_ORDER, raw_intensities, write_phantom_dataset

SHAPE = (12, 14, 10)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    for layout in ("brats2020", "brats2023", "nnunet", "patchddm-preprocessed"):
        write_phantom_dataset(root / layout, 2, SHAPE, layout=layout)
    return root


def test_brats2020_detected_with_channel_order(datasets):
    ds = open_dataset(datasets / "brats2020")
    assert ds.layout == "brats2020" and not ds.preprocessed
    assert ds.case_ids == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert ds.label_values == (0, 1, 2, 4)
    c = ds.cases[0]
    assert [p.name for p in c.images] == [f"BraTS20_Training_001_{m}.nii.gz" for m in MODALITIES]
    assert c.label.name == "BraTS20_Training_001_seg.nii.gz"


def test_brats2023_names_and_labels(datasets):
    ds = open_dataset(datasets / "brats2023")
    assert ds.layout == "brats2023"
    assert [p.name.split("-")[-1] for p in ds.cases[0].images] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz",
                                                                   "t2f.nii.gz"]
    assert ds.label_values == (0, 1, 2, 3) and ds.regions["ET"] == (3,)


def test_nnunet_channels_reordered_from_dataset_json(datasets):
    ds = open_dataset(datasets / "nnunet")
    assert ds.layout == "nnunet" and ds.channel_names == MODALITIES
    assert ds.label_values == (0, 1, 2, 4)
    # file _000i holds modality NNUNET_ORDER[i]; the case must list them as t1, t1ce, t2, flair
    idx = [int(p.name.split("_")[-1][:4]) for p in ds.cases[0].images]
    assert [NNUNET_ORDER[i] for i in idx] == list(MODALITIES)
    # and the data agree: channel t1 holds the t1 intensities written by the synthetic writer
    t1 = np.asarray(nib.load(ds.cases[0].images[0]).dataobj)
    brats_t1 = np.asarray(nib.load(datasets / "brats2020/BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz").dataobj)
    np.testing.assert_array_equal(t1, brats_t1)
    # an images folder of the dataset works too (predict on imagesTs-like folders)
    assert open_dataset(datasets / "nnunet" / "imagesTr", require_labels=False).case_ids == ds.case_ids


def test_nnunet_v1_json_and_unknown_channel_names(tmp_path, datasets):
    root = tmp_path / "ds"
    shutil.copytree(datasets / "nnunet", root)
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT_a", "1": "CT_b", "2": "CT_c", "3": "CT_d"},
        "labels": {"0": "background", "1": "a", "2": "b", "4": "c"}}))
    ds = open_dataset(root)
    assert ds.channel_names == ("CT_a", "CT_b", "CT_c", "CT_d")  # kept in file order
    assert [p.name[-11:-7] for p in ds.cases[0].images] == ["0000", "0001", "0002", "0003"]
    assert ds.label_values == (0, 1, 2, 4)


def test_reference_preprocessed_layout(datasets):
    ds = open_dataset(datasets / "patchddm-preprocessed")
    assert ds.layout == "patchddm-preprocessed" and ds.preprocessed
    assert ds.case_ids == ["000001", "000002"]
    assert ds.cases[0].images[3].name == "brats_train_001_flair_000_w.nii.gz"


def test_marker_turns_brats_naming_into_preprocessed(tmp_path, datasets):
    root = tmp_path / "ds"
    shutil.copytree(datasets / "brats2020", root)
    (root / PREPROCESSED_MARKER).write_text("{}")
    ds = open_dataset(root)
    assert ds.layout == "patchddm-preprocessed" and ds.preprocessed
    assert open_dataset(datasets / "brats2020", layout="patchddm-preprocessed").preprocessed


def test_nested_case_and_flat_folders(tmp_path, datasets):
    nested = tmp_path / "download" / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(datasets / "brats2020", nested)
    assert open_dataset(tmp_path / "download").case_ids == ["BraTS20_Training_001", "BraTS20_Training_002"]
    # a single case folder is a dataset of one case
    single = open_dataset(nested / "BraTS20_Training_002")
    assert single.case_ids == ["BraTS20_Training_002"]
    # several cases side by side in one folder are grouped by name prefix
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in nested.glob("*/*.nii.gz"):
        shutil.copy(f, flat / f.name)
    assert open_dataset(flat).case_ids == ["BraTS20_Training_001", "BraTS20_Training_002"]


def test_prediction_folders_are_skipped(tmp_path, datasets):
    root = tmp_path / "ds"
    shutil.copytree(datasets / "brats2020", root)
    preds = root / "preds"
    preds.mkdir()
    shutil.copy(root / "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz", preds / "BraTS20_Training_001_seg.nii.gz")
    with pytest.raises(DatasetError, match="missing modality"):
        open_dataset(root)  # without the marker the prediction looks like a label-only case
    (preds / PREDICTION_MARKER).write_text("{}")
    assert len(open_dataset(root).cases) == 2


def test_no_layout_error_names_folder_and_contents(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "no files matching" in msg and "notes.txt" in msg and "BraTS" in msg
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")


def test_missing_modality_names_case_and_expected_file(tmp_path, datasets):
    root = tmp_path / "ds"
    shutil.copytree(datasets / "brats2020", root)
    (root / "BraTS20_Training_002/BraTS20_Training_002_t1ce.nii.gz").unlink()
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    msg = str(e.value)
    assert "BraTS20_Training_002" in msg and "'t1ce'" in msg and "BraTS20_Training_002_t1ce.nii.gz" in msg


def test_missing_label_only_an_error_when_required(tmp_path, datasets):
    root = tmp_path / "ds"
    shutil.copytree(datasets / "brats2020", root)
    (root / "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz").unlink()
    with pytest.raises(DatasetError, match="no label file BraTS20_Training_001_seg.nii.gz"):
        open_dataset(root)
    ds = open_dataset(root, require_labels=False)
    assert ds.cases[0].label is None and ds.cases[1].label is not None


def test_nnunet_missing_channel_and_bad_json(tmp_path, datasets):
    root = tmp_path / "ds"
    shutil.copytree(datasets / "nnunet", root)
    (root / "imagesTr/BraTS20_Training_002_0003.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"BraTS20_Training_002 is missing channel 3 .*_0003\.nii\.gz"):
        open_dataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        open_dataset(root)


def test_mixed_layouts_rejected(tmp_path, datasets):
    shutil.copytree(datasets / "brats2020", tmp_path / "a")
    shutil.copytree(datasets / "brats2023", tmp_path / "b")
    with pytest.raises(DatasetError, match="several layouts"):
        open_dataset(tmp_path)
    assert open_dataset(tmp_path, layout="brats2023").layout == "brats2023"


def test_case_from_files_and_label_files(datasets):
    folder = datasets / "brats2020" / "BraTS20_Training_001"
    files = [folder / f"BraTS20_Training_001_{m}.nii.gz" for m in MODALITIES]
    case = case_from_files(files)
    assert case.case_id == "BraTS20_Training_001" and case.images == tuple(files) and case.label is None
    with pytest.raises(DatasetError, match="does not exist"):
        case_from_files([folder / "missing_t1.nii.gz"])
    labels = label_files(datasets / "nnunet" / "labelsTr")
    assert sorted(labels) == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert raw_intensities(np.ones((4, 1, 1, 1))).ravel().tolist() == [900, 1400, 2100, 700]
