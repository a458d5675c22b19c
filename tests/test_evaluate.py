"""``patchddm evaluate`` reproduces in-memory metrics from NIfTI files, in mm on anisotropic grids."""
import argparse
import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from patchddm_fast.cli import evaluate
from patchddm_fast.data import DatasetError
from synthetic_data import oblique_affine, save_volume, write_phantom_dataset
from patchddm_fast.eval.metrics import dice, hd95

SHAPE = (20, 24, 16)
SPACING = (1.0, 1.0, 1.5)


def scipy_hd95(a, b, spacing):
    """Independent HD95: 6-neighbour surfaces, exact EDT in mm, max of the two directed 95th percentiles."""
    st = ndimage.generate_binary_structure(3, 1)
    sa, sb = a & ~ndimage.binary_erosion(a, st), b & ~ndimage.binary_erosion(b, st)
    da = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    db = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return max(np.percentile(da, 95), np.percentile(db, 95))


def blob(centre, radii):
    g = np.indices(SHAPE).astype(float)
    return sum(((g[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip(centre, radii))) <= 1


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers(dest="command"))
    return evaluate.run(parser.parse_args(["evaluate", *map(str, argv)]))


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.fixture
def binary_case_files(tmp_path):
    """Flat gt folder (<case>.nii.gz) and a prediction folder, plus the in-memory masks."""
    aff = oblique_affine(SPACING)
    masks = {
        "c1": (blob((10, 12, 8), (5, 6, 4)), blob((11, 12, 7), (5, 5, 4))),
        "c2": (blob((6, 8, 5), (3, 4, 3)), blob((14, 16, 10), (3, 3, 3))),
        "c3_empty_pred": (blob((10, 12, 8), (4, 4, 3)), np.zeros(SHAPE, bool)),
        "c4_both_empty": (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)),
    }
    for cid, (gt, pred) in masks.items():
        save_volume(gt.astype(np.uint8), aff, tmp_path / "gt" / f"{cid}.nii.gz")
        save_volume(pred.astype(np.uint8), aff, tmp_path / "pred" / f"{cid}_seg.nii.gz")
    return tmp_path, masks


def test_binary_metrics_match_in_memory_and_json_is_strict(binary_case_files):
    root, masks = binary_case_files
    assert run_cli("--pred", root / "pred", "--gt", root / "gt", "--out", root / "m" / "metrics.json", "--quiet") == 0
    res = _strict_json(root / "m" / "metrics.json")
    by_case = {r["case"]: r for r in res["cases"]}
    assert sorted(by_case) == sorted(masks)
    for cid, (gt, pred) in masks.items():
        r = by_case[cid]["WT"]
        assert by_case[cid]["spacing"] == pytest.approx(SPACING)
        inter, total = (gt & pred).sum(), gt.sum() + pred.sum()
        assert r["dice"] == pytest.approx(2 * inter / total if total else 1.0, abs=1e-12)
        assert r["dice"] == dice(pred, gt)
        h = hd95(pred, gt, spacing=SPACING, pooled=False)
        assert (r["hd95"] is None) == (not np.isfinite(h))
        if gt.any() and pred.any():
            assert r["hd95"] == pytest.approx(scipy_hd95(pred, gt, SPACING), abs=1e-3)
        assert (r["gt_voxels"], r["pred_voxels"]) == (int(gt.sum()), int(pred.sum()))
    assert by_case["c4_both_empty"]["WT"] == dict(dice=1.0, hd95=0.0, gt_voxels=0, pred_voxels=0, lesion_wise=dict(
        dice=1.0, hd95=0.0, n_tp=0, n_fn=0, n_fp=0))
    assert by_case["c3_empty_pred"]["WT"]["hd95"] is None and by_case["c3_empty_pred"]["WT"]["dice"] == 0.0
    # anisotropy matters: the same masks measured at 1 mm isotropic give a different HD95
    assert by_case["c1"]["WT"]["hd95"] != pytest.approx(hd95(*masks["c1"][::-1], spacing=(1, 1, 1)))

    s = res["summary"]["WT"]
    d = np.array([by_case[c]["WT"]["dice"] for c in masks])
    h = np.array([by_case[c]["WT"]["hd95"] for c in masks if by_case[c]["WT"]["hd95"] is not None])
    assert s["dice"] == pytest.approx(dict(mean=d.mean(), median=np.median(d), std=d.std()))
    assert s["hd95"] == pytest.approx(dict(mean=h.mean(), median=np.median(h), std=h.std()))
    assert (s["n_cases"], s["n_hd95_finite"], s["n_hd95_infinite"]) == (4, 3, 1)
    assert (s["n_gt_empty"], s["n_pred_empty"], s["n_both_empty"]) == (1, 2, 1)

    rows = list(csv.DictReader(open(root / "m" / "metrics.csv")))
    assert len(rows) == 4 and {r["region"] for r in rows} == {"WT"}
    row = {r["case"]: r for r in rows}
    assert row["c3_empty_pred"]["hd95_mm"] == "inf"
    assert float(row["c1"]["dice"]) == by_case["c1"]["WT"]["dice"]
    assert float(row["c1"]["hd95_mm"]) == by_case["c1"]["WT"]["hd95"]


def test_brats_regions_on_multiclass_labels(tmp_path):
    rng = np.random.default_rng(0)
    aff = oblique_affine(SPACING)
    gt = np.zeros(SHAPE, np.uint8)
    gt[blob((10, 12, 8), (6, 7, 5))] = 2
    gt[blob((10, 12, 8), (4, 4, 3))] = 4
    gt[blob((10, 12, 8), (2, 2, 2))] = 1
    pred = gt.copy()
    flip = rng.random(SHAPE) < 0.05
    pred[flip] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=int(flip.sum()))
    save_volume(gt, aff, tmp_path / "gt" / "case.nii.gz")
    save_volume(pred, aff, tmp_path / "pred" / "case_seg.nii.gz")
    res = evaluate.evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels="brats")
    rec = res["cases"][0]
    for name, values in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))):
        p, g = np.isin(pred, values), np.isin(gt, values)
        assert rec[name]["dice"] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()), abs=1e-12)
        assert rec[name]["hd95"] == pytest.approx(scipy_hd95(p, g, SPACING), abs=1e-3)
    assert list(res["summary"]) == ["WT", "TC", "ET"]
    # BraTS 2023 convention: ET is 3; a value 4 is then unexpected
    with pytest.raises(DatasetError, match=r"case_seg.nii.gz: unexpected label values \[4\]"):
        evaluate.evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels="brats2023")


def test_grid_mismatches_name_both_files(binary_case_files):
    root, _ = binary_case_files
    save_volume(np.zeros((20, 24, 17), np.uint8), oblique_affine(SPACING), root / "pred" / "c1_seg.nii.gz")
    with pytest.raises(DatasetError) as e:
        evaluate.evaluate_folders(root / "pred", root / "gt")
    assert "c1_seg.nii.gz" in str(e.value) and "c1.nii.gz" in str(e.value) and "shape" in str(e.value)
    save_volume(np.zeros(SHAPE, np.uint8), oblique_affine((1, 1, 1)), root / "pred" / "c1_seg.nii.gz")
    with pytest.raises(DatasetError, match=r"c1_seg.nii.gz: affine does not match ground truth .*c1.nii.gz"):
        evaluate.evaluate_folders(root / "pred", root / "gt")
    empty = root / "nothing"
    empty.mkdir()
    save_volume(np.zeros(SHAPE, np.uint8), oblique_affine(SPACING), empty / "zz_seg.nii.gz")
    with pytest.raises(DatasetError, match="no <case>_seg.nii.gz prediction matches"):
        evaluate.evaluate_folders(empty, root / "gt")


def test_dataset_gt_with_figures_and_missing_predictions(tmp_path):
    ids = write_phantom_dataset(tmp_path / "ds", 2, SHAPE)
    pred_dir = tmp_path / "pred"
    cid = ids[0]
    seg = nib.load(tmp_path / "ds" / cid / f"{cid}_seg.nii.gz")
    gt = np.asarray(seg.dataobj) > 0
    pred = ndimage.binary_dilation(gt)
    save_volume(pred.astype(np.uint8), seg.affine, pred_dir / f"{cid}_seg.nii.gz")
    save_volume(pred.astype(np.float32) * 0.9, seg.affine, pred_dir / f"{cid}_prob.nii.gz")
    save_volume(pred.astype(np.float32) * 0.05, seg.affine, pred_dir / f"{cid}_var.nii.gz")
    out = tmp_path / "metrics.json"
    assert run_cli("--pred", pred_dir, "--gt", tmp_path / "ds", "--out", out, "--figures", "--quiet") == 0
    res = _strict_json(out)
    assert res["missing_predictions"] == [ids[1]] and len(res["cases"]) == 1
    assert res["cases"][0]["WT"]["dice"] == pytest.approx(dice(pred, gt))
    figs = tmp_path / "metrics_figures"
    assert (figs / f"{cid}.png").stat().st_size > 10_000 and (figs / "summary.png").stat().st_size > 5_000
