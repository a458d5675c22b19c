"""``patchddm predict``: outputs on the input's exact grid and header, and the safety rules.

Most tests use a stand-in model that follows the lead's inference contract
(``load_for_inference`` -> (model, diffusion, config); ``segment_volume`` -> mean/var/mask on
the grid it is given) and whose output is a closed-form function of the normalised FLAIR,
so every written voxel can be checked against an independent float64 computation.  The
last test runs the real tiny network from a real checkpoint end to end.
"""
import argparse
import json
import shutil
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from patchddm_fast.cli import predict
from patchddm_fast.data import DatasetError
from patchddm_fast.data.layouts import MODALITIES
from synthetic_data import write_phantom_dataset

SHAPE = (20, 24, 16)
MULTIPLE = 8
SHIFTS = (-0.1, 0.05, 0.2)  # stand-in ensemble member k = clamp(flair + SHIFTS[k], 0, 1)


class StandIn(torch.nn.Module):
    size_multiple = MULTIPLE

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def fake_load_for_inference(path, device="cpu"):
    return StandIn(), "diffusion", {"method": "patchddm", "image_channels": 4,
                                    "preprocess": {"multiple": MULTIPLE, "lower_percentile": 1.0}}


def fake_segment_volume(model, diffusion, image, *, method, ensemble, steps, seed, threshold=0.5, progress=True,
                        desc=""):
    assert image.dtype == torch.float32 and image.shape[0] == 4
    assert all(s % MULTIPLE == 0 for s in image.shape[1:]) and 0 <= image.min() and image.max() <= 1
    samples = torch.stack([(image[3] + SHIFTS[k]).clamp(0, 1) for k in range(ensemble)])
    mean = samples.mean(0)
    return SimpleNamespace(mean=mean, var=samples.var(0, unbiased=False), mask=mean > threshold)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr("patchddm_fast.training.checkpoint.load_for_inference", fake_load_for_inference)
    monkeypatch.setattr("patchddm_fast.sampling.segment.segment_volume", fake_segment_volume)


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    predict.add_parser(parser.add_subparsers(dest="command"))
    return predict.run(parser.parse_args(["predict", *map(str, argv)]))


def expected_outputs(flair_raw, brain, ensemble=3, threshold=0.5, lower=1.0, upper=99.5):
    """Independent float64 expectation on the ORIGINAL grid."""
    v = flair_raw[brain].astype(np.float64)
    lo, hi = np.percentile(v, [lower, upper])
    f = np.zeros(flair_raw.shape)
    f[brain] = (np.clip(v, lo, hi) - lo) / (hi - lo)
    samples = np.stack([np.clip(f + SHIFTS[k], 0, 1) for k in range(ensemble)])
    mean = samples.mean(0)
    # background voxels are 0 after normalisation, so there the stand-in gives mean(clamp(SHIFTS))
    return mean, samples.var(0), (mean > threshold).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_phantom_dataset(root / "brats", 2, SHAPE)
    write_phantom_dataset(root / "nnunet", 1, SHAPE, layout="nnunet")
    return root


def _case_arrays(folder, cid):
    raw = np.stack([np.asarray(nib.load(folder / f"{cid}_{m}.nii.gz").dataobj) for m in MODALITIES]).astype(np.float32)
    return raw[3], np.any(raw != 0, axis=0)


def test_case_folder_outputs_on_original_grid(stand_in, data, tmp_path):
    cid = "BraTS20_Training_001"
    case_dir = data / "brats" / cid
    assert run_cli("--model", "m.pt", "--input", case_dir, "--out", tmp_path / "out", "--ensemble", 3, "--steps", 2,
                   "--quiet") == 0
    src = nib.load(case_dir / f"{cid}_t1.nii.gz")
    flair, brain = _case_arrays(case_dir, cid)
    mean, var, mask = expected_outputs(flair, brain)
    for suffix, dtype, exp in (("seg", np.uint8, mask), ("prob", np.float32, mean), ("var", np.float32, var)):
        img = nib.load(tmp_path / "out" / f"{cid}_{suffix}.nii.gz")
        assert img.shape == SHAPE and img.get_data_dtype() == dtype
        np.testing.assert_array_equal(img.affine, src.affine)
        assert img.header.get_zooms() == src.header.get_zooms()
        for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d",
                    "xyzt_units"):
            np.testing.assert_array_equal(img.header[key], src.header[key], err_msg=f"{suffix}: {key}")
        np.testing.assert_allclose(np.asarray(img.dataobj), exp, atol=1e-6, err_msg=suffix)
    assert mask.any() and not mask.all()
    log = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert log["cases"][0]["box"]["original_shape"] == list(SHAPE) and log["preprocess"]["multiple"] == MULTIPLE


def test_dataset_folder_file_list_and_nnunet(stand_in, data, tmp_path):
    assert run_cli("--model", "m", "--input", data / "brats", "--out", tmp_path / "a", "--ensemble", 2, "--quiet") == 0
    names = sorted(p.name for p in (tmp_path / "a").glob("*.nii.gz"))
    assert names == sorted(f"BraTS20_Training_00{i}_{s}.nii.gz" for i in (1, 2) for s in ("seg", "prob", "var"))
    files = [data / "brats/BraTS20_Training_002" / f"BraTS20_Training_002_{m}.nii.gz" for m in MODALITIES]
    assert run_cli("--model", "m", "--input", *files, "--out", tmp_path / "b", "--ensemble", 2, "--quiet") == 0
    for s in ("seg", "prob", "var"):
        a = nib.load(tmp_path / "a" / f"BraTS20_Training_002_{s}.nii.gz")
        b = nib.load(tmp_path / "b" / f"BraTS20_Training_002_{s}.nii.gz")
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    # nnU-Net files are stored FLAIR-first: the reordering must give the same prediction as BraTS naming
    assert run_cli("--model", "m", "--input", data / "nnunet", "--out", tmp_path / "c", "--ensemble", 2, "--quiet") == 0
    a = nib.load(tmp_path / "a" / "BraTS20_Training_001_prob.nii.gz")
    c = nib.load(tmp_path / "c" / "BraTS20_Training_001_prob.nii.gz")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(c.dataobj))


def test_refuses_input_folders_and_existing_outputs(stand_in, data, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(data / "brats", ds)
    case_dir = ds / "BraTS20_Training_001"
    with pytest.raises(DatasetError, match="refusing to write predictions into the input folder"):
        run_cli("--model", "m", "--input", case_dir, "--out", case_dir, "--quiet")
    with pytest.raises(DatasetError, match="refusing to write predictions into the input folder"):
        run_cli("--model", "m", "--input", ds, "--out", ds, "--quiet")
    files = [case_dir / f"BraTS20_Training_001_{m}.nii.gz" for m in MODALITIES]
    with pytest.raises(DatasetError, match="input folder"):
        run_cli("--model", "m", "--input", *files, "--out", case_dir, "--quiet")
    with pytest.raises(DatasetError, match="holds the input case folder"):  # stray outputs would break the dataset
        run_cli("--model", "m", "--input", case_dir, "--out", ds, "--quiet")
    before = {p: p.stat().st_mtime_ns for p in ds.rglob("*.nii.gz")}
    out = tmp_path / "out"
    assert run_cli("--model", "m", "--input", case_dir, "--out", out, "--ensemble", 1, "--quiet") == 0
    with pytest.raises(DatasetError, match="exist already.*--overwrite"):
        run_cli("--model", "m", "--input", case_dir, "--out", out, "--quiet")
    assert run_cli("--model", "m", "--input", case_dir, "--out", out, "--ensemble", 1, "--overwrite", "--quiet") == 0
    assert before == {p: p.stat().st_mtime_ns for p in ds.rglob("*.nii.gz")}, "an input file was touched"
    # an output folder inside the dataset is marked and ignored when the dataset is read again
    inner = ds / "predictions"
    assert run_cli("--model", "m", "--input", ds, "--out", inner, "--ensemble", 1, "--quiet") == 0
    assert run_cli("--model", "m", "--input", ds, "--out", tmp_path / "again", "--ensemble", 1, "--quiet") == 0
    with pytest.raises(SystemExit) as exc:  # rejected by the flag's type, before anything runs
        run_cli("--model", "m", "--input", case_dir, "--out", tmp_path / "x", "--ensemble", 0)
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


def test_real_tiny_checkpoint_end_to_end(data, tmp_path):
    """The real loader and sampler with a tiny network: outputs exist on the input grid, values are sane."""
    from patchddm_fast.training.checkpoint import save_checkpoint
    from patchddm_fast.training.config import TrainConfig
    from conftest import tiny_unet_kwargs

    arch = {k: v for k, v in tiny_unet_kwargs().items() if k != "in_channels"}
    config = TrainConfig(method="patchddm", model=arch).to_dict()
    config["preprocess"] = {"multiple": 8}
    from patchddm_fast.training.checkpoint import build_model

    torch.manual_seed(0)
    model = build_model(config)
    save_checkpoint(tmp_path / "tiny.pt", {"model": model.state_dict()}, config)
    case_dir = data / "brats" / "BraTS20_Training_001"
    assert run_cli("--model", tmp_path / "tiny.pt", "--input", case_dir, "--out", tmp_path / "out", "--ensemble", 2,
                   "--steps", 2, "--quiet", "--figures") == 0
    src = nib.load(case_dir / "BraTS20_Training_001_t1.nii.gz")
    prob = nib.load(tmp_path / "out" / "BraTS20_Training_001_prob.nii.gz")
    seg = nib.load(tmp_path / "out" / "BraTS20_Training_001_seg.nii.gz")
    var = nib.load(tmp_path / "out" / "BraTS20_Training_001_var.nii.gz")
    for img in (prob, seg, var):
        assert img.shape == SHAPE
        np.testing.assert_array_equal(img.affine, src.affine)
    p, v = np.asarray(prob.dataobj), np.asarray(var.dataobj)
    assert np.isfinite(p).all() and np.all(v >= 0)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), (p > 0.5).astype(np.uint8))
    assert (tmp_path / "out" / "BraTS20_Training_001_prediction.png").stat().st_size > 10_000


def test_train_predict_evaluate_round_trip(data, tmp_path, monkeypatch):
    """Issue 3's 'done means': train a few steps on NIfTI phantoms with an oblique anisotropic grid,
    predict, and evaluate; outputs sit on the input grid and evaluate reproduces in-memory metrics."""
    from conftest import tiny_unet_kwargs

    from patchddm_fast.training.checkpoint import load_for_inference
    from patchddm_fast.cli import evaluate
    from patchddm_fast.training.config import TrainConfig
    from patchddm_fast.data import load_case, open_dataset
    from patchddm_fast.data.training_sets import preprocess_config_for
    from patchddm_fast.data.preprocess import preprocess_case
    from patchddm_fast.eval.metrics import dice, hd95
    from patchddm_fast.sampling.segment import segment_volume
    from patchddm_fast.training.trainer import Trainer

    monkeypatch.setenv("PATCHDDM_CACHE", str(tmp_path / "cache"))
    arch = {k: v for k, v in tiny_unet_kwargs().items() if k != "in_channels"}
    cfg = TrainConfig(method="patchddm", model=arch, data=str(data / "brats"), steps=2, patch_size=8, val_every=0,
                      ckpt_every=0, log_every=1, out_dir=str(tmp_path / "run"), device="cpu", progress=False)
    Trainer(cfg).fit()
    ckpt = tmp_path / "run" / "last.pt"
    out = tmp_path / "pred"
    assert run_cli("--model", ckpt, "--input", data / "brats", "--out", out, "--ensemble", 2, "--steps", 1,
                   "--seed", 7, "--quiet") == 0
    evaluate.write_metrics(evaluate.evaluate_folders(out, data / "brats"), tmp_path / "metrics.json")
    metrics = {r["case"]: r["WT"] for r in json.loads((tmp_path / "metrics.json").read_text())["cases"]}

    model, diffusion, config = load_for_inference(ckpt)
    pre = preprocess_config_for(config.get("preprocess"), model.size_multiple)
    ds = open_dataset(data / "brats")
    assert sorted(metrics) == ds.case_ids
    for case in ds.cases:
        lc = load_case(case, label_values=ds.label_values)
        prep = preprocess_case(lc, pre)
        res = segment_volume(model, diffusion, torch.from_numpy(prep.image), method="patchddm", ensemble=2, steps=1,
                             seed=7, progress=False)
        mask = prep.box.invert(res.mask.numpy())
        seg = nib.load(out / f"{case.case_id}_seg.nii.gz")
        src = nib.load(case.images[0])
        assert seg.shape == src.shape and seg.header.get_zooms() == src.header.get_zooms()
        np.testing.assert_array_equal(seg.affine, src.affine)
        np.testing.assert_array_equal(np.asarray(seg.dataobj), mask.astype(np.uint8))
        gt = lc.label > 0
        assert metrics[case.case_id]["dice"] == pytest.approx(dice(mask, gt), abs=1e-12)
        h = hd95(mask, gt, spacing=lc.zooms, pooled=False)
        assert metrics[case.case_id]["hd95"] == (pytest.approx(h, abs=1e-9) if np.isfinite(h) else None)


def test_preprocessing_warning_only_when_the_checkpoint_lacks_it(data, tmp_path, capsys):
    """Issue 13.3: the 'stores no preprocessing parameters' warning is for old checkpoints only;
    one that stores its (default) preprocessing, as every trained one now does, predicts silently."""
    from patchddm_fast.training.checkpoint import build_model, save_checkpoint
    from patchddm_fast.training.config import TrainConfig
    from patchddm_fast.data.preprocess import PreprocessConfig
    from conftest import tiny_unet_kwargs

    arch = {k: v for k, v in tiny_unet_kwargs().items() if k != "in_channels"}
    config = TrainConfig(method="patchddm", model=arch).to_dict()
    torch.manual_seed(0)
    state = {"model": build_model(config).state_dict()}
    case_dir = data / "brats" / "BraTS20_Training_001"
    for name, pre, warns in (("old", {}, True), ("new", PreprocessConfig(multiple=4).to_dict(), False)):
        save_checkpoint(tmp_path / f"{name}.pt", state, dict(config, preprocess=pre))
        capsys.readouterr()
        assert run_cli("--model", tmp_path / f"{name}.pt", "--input", case_dir, "--out", tmp_path / name,
                       "--ensemble", 1, "--steps", 1) == 0
        assert ("stores no preprocessing parameters" in capsys.readouterr().err) == warns, name


def test_memory_budget_is_planned_by_the_command_and_handed_to_the_sampler(stand_in, data, tmp_path, monkeypatch):
    """The sampler receives a plan; the planner runs only because --memory-budget was given."""
    planned, received = [], []

    def fake_plan_sampling(model, budget, method, image_shape, ensemble=1):
        planned.append((budget, method, tuple(image_shape), ensemble))
        return "the plan"

    def segment_with_plan(model, diffusion, image, *, plan=None, **kwargs):
        received.append(plan)
        return fake_segment_volume(model, diffusion, image, **kwargs)

    monkeypatch.setattr("patchddm_fast.analysis.planner.plan_sampling", fake_plan_sampling)
    monkeypatch.setattr("patchddm_fast.sampling.segment.segment_volume", segment_with_plan)
    case_dir = data / "brats" / "BraTS20_Training_001"
    assert run_cli("--model", "m.pt", "--input", case_dir, "--out", tmp_path / "a", "--ensemble", 3, "--steps", 2,
                   "--quiet") == 0
    assert planned == [] and received == [None]
    assert run_cli("--model", "m.pt", "--input", case_dir, "--out", tmp_path / "b", "--ensemble", 3, "--steps", 2,
                   "--quiet", "--memory-budget", "8GB") == 0
    assert len(planned) == 1 and planned[0][0] == "8GB" and planned[0][3] == 3 and received[-1] == "the plan"
