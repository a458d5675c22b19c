"""Region training (--target regions): three mask channels through data, model, trainer, sampler and outputs."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from patchddm_fast import Trainer
from patchddm_fast.training.checkpoint import build_model, load_for_inference
from patchddm_fast.model.conditioning import target_mask
from patchddm_fast.model.method import get_method
from patchddm_fast.training.cases import BatchSampler, step_generators
from patchddm_fast.training.sources import phantom_cases
from patchddm_fast.data.regions import label_map, region_masks
from patchddm_fast.sampling.segment import segment_volume
from patchddm_fast.cli.showcase import evaluate_cases

TINY = dict(base_width=8, channel_mult=(1, 2), enc_blocks=1, dec_blocks=2, mid_blocks=1, groups=4)


def tiny_config(tmp_path, **kw):
    return dict(dict(method="patchddm", target="regions", model=TINY, phantom_size=16, phantom_train=2,
                     phantom_val=1, patch_size=8, steps=3, lr=1e-3, ckpt_every=0, log_every=1, device="cpu",
                     progress=False, out_dir=str(tmp_path / "run"), diffusion=dict(prediction="v")), **kw)


def test_only_first_and_last_layers_change():
    binary = build_model(dict(method="patchddm", model=TINY))
    regions = build_model(dict(method="patchddm", model=TINY, target="regions"))
    b, r = dict(binary.named_parameters()), dict(regions.named_parameters())
    assert b.keys() == r.keys()
    changed = {k for k in b if b[k].shape != r[k].shape}
    assert changed == {"conv_in.weight", "conv_out.weight", "conv_out.bias"}
    assert r["conv_in.weight"].shape[1] == get_method("patchddm").in_channels("regions") == 10
    assert r["conv_out.weight"].shape[0] == 3


def test_targets_are_the_nested_regions_of_the_phantom_labels():
    cases = phantom_cases(2, 16, seed=0, multiple=2)
    labels = cases[0].label
    assert set(np.unique(labels.numpy())) <= {0, 1, 2, 4} and (labels == 4).any() and (labels == 1).any()
    x0 = target_mask(labels, "patchddm", "regions", "brats2020")
    assert x0.shape == (3, 16, 16, 16)
    np.testing.assert_array_equal(x0[0].numpy(), np.isin(labels.numpy(), (1, 2, 4)))
    np.testing.assert_array_equal(x0[1].numpy(), np.isin(labels.numpy(), (1, 4)))
    np.testing.assert_array_equal(x0[2].numpy(), labels.numpy() == 4)
    # binary target: unchanged whole-tumour mask
    np.testing.assert_array_equal(target_mask(labels, "patchddm").numpy(), (labels > 0).numpy()[None])
    sampler = BatchSampler(cases, "patchddm", 8, target="regions", convention="brats2020")
    cond, x0 = sampler.batch(step_generators(0, 0)[0], 2)
    assert cond.shape == (2, 7, 8, 8, 8) and x0.shape == (2, 3, 8, 8, 8)


def test_region_run_end_to_end(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    trainer.fit()
    assert trainer.config.label_convention == "brats2020"
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (stored["target"], stored["label_convention"]) == ("regions", "brats2020")
    model, diffusion, cfg = load_for_inference(tmp_path / "run" / "last.pt")
    assert (cfg["target"], cfg["label_convention"]) == ("regions", "brats2020")
    image = torch.rand(4, 12, 10, 14)  # not a multiple of the network's size: padded and cropped back
    res = segment_volume(model, diffusion, image, method="patchddm", ensemble=2, steps=2, seed=0, progress=False,
                         keep_samples=True)
    assert res.mean.shape == res.var.shape == res.mask.shape == (3, 12, 10, 14)
    assert res.samples.shape == (2, 3, 12, 10, 14)
    torch.testing.assert_close(res.mean, res.samples.mean(0))
    assert not (res.mask[1] & ~res.mask[0]).any() and not (res.mask[2] & ~res.mask[1]).any()

    val = phantom_cases(1, 16, seed=5, multiple=2)
    val[0].affine = np.diag([1.2, 1.0, 0.8, 1.0])  # an anisotropic grid: every output must keep it
    metrics = evaluate_cases(model, diffusion, "patchddm", val, tmp_path / "out", ensemble=2, steps=2, seed=0,
                             progress=False, figures=False, convention="brats2020")
    assert set(metrics["regions"]) == {"WT", "TC", "ET"}
    rec = metrics["cases"][0]
    assert rec["dice"] == rec["regions"]["WT"]["dice"]
    seg = np.asarray(nib.load(tmp_path / "out" / f"{val[0].case_id}_seg.nii.gz").dataobj)
    for written in (tmp_path / "out").glob("*.nii.gz"):
        np.testing.assert_allclose(nib.load(written).affine, val[0].affine, atol=1e-6)
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    probs = np.stack([np.asarray(nib.load(tmp_path / "out" / f"{val[0].case_id}_mean_{n}.nii.gz").dataobj)
                      for n in ("WT", "TC", "ET")])
    np.testing.assert_array_equal(region_masks(seg, "brats2020"), region_masks(label_map(probs > 0.5, "brats2020"),
                                                                               "brats2020"))


def test_label_convention_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"'target' = 'multiclass': expected one of 'binary', 'regions'"):
        Trainer(tiny_config(tmp_path, target="multiclass"))
    with pytest.raises(ValueError, match=r"'label_convention' = 'brats2019': expected one of"):
        Trainer(tiny_config(tmp_path, label_convention="brats2019"))


def test_simulator_follows_the_region_model():
    """The three-channel target grows only conv_in and conv_out: weight bytes differ by exactly
    those layers' extra parameters, and the simulated training peak can only grow."""
    from patchddm_fast.analysis import simulate
    from patchddm_fast.analysis.planner import region_channels

    binary = simulate("patchddm", "train", size=16, recipe="paper", model_kwargs=TINY)
    regions = simulate("patchddm", "train", size=16, recipe="paper",
                       model_kwargs=dict(TINY, **region_channels("patchddm", "regions")))
    width = TINY["base_width"]
    extra_params = 2 * width * 27 + (2 * width * 27 + 2)  # conv_in: 2 more inputs; conv_out: 2 more outputs + bias
    assert regions.to_dict()["totals"]["weights"] - binary.to_dict()["totals"]["weights"] == 4 * extra_params
    assert regions.peak_allocated_bytes > binary.peak_allocated_bytes


@pytest.mark.parametrize("layout, values", [("brats2020", {0, 1, 2, 4}), ("brats2023", {0, 1, 2, 3})])
def test_region_train_predict_evaluate_on_brats_folders(layout, values, tmp_path, monkeypatch):
    """2020 and 2023 naming: the checkpoint remembers the convention, predict writes label maps in it
    on the input grid, and evaluate detects it and reproduces the in-memory per-region scores."""
    import argparse

    from patchddm_fast.cli import evaluate

    from patchddm_fast.cli import predict
    from patchddm_fast.data import load_case, open_dataset
    from patchddm_fast.data.preprocess import preprocess_case
    from synthetic_data import write_phantom_dataset
    from patchddm_fast.data.training_sets import preprocess_config_for
    from patchddm_fast.eval.metrics import dice

    monkeypatch.setenv("PATCHDDM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_phantom_dataset(data, 3, (18, 20, 16), layout=layout)
    Trainer(tiny_config(tmp_path, data=str(data), test_fraction=0.0, val_fraction=0.0, steps=2)).fit()
    ckpt = tmp_path / "run" / "last.pt"
    _, _, cfg = load_for_inference(ckpt)
    assert cfg["label_convention"] == layout

    parser = argparse.ArgumentParser()
    predict.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "pred"
    assert predict.run(parser.parse_args(["predict", "--model", str(ckpt), "--input", str(data), "--out", str(out),
                                          "--ensemble", "2", "--steps", "2", "--quiet"])) == 0
    result = evaluate.evaluate_folders(out, data)
    assert result["labels"] == layout and list(result["summary"]) == ["WT", "TC", "ET"]

    model, diffusion, _ = load_for_inference(ckpt)
    pre = preprocess_config_for(cfg.get("preprocess"), model.size_multiple)
    ds = open_dataset(data)
    by_case = {r["case"]: r for r in result["cases"]}
    for case in ds.cases:
        seg_img = nib.load(out / f"{case.case_id}_seg.nii.gz")
        src = nib.load(case.images[0])
        np.testing.assert_array_equal(seg_img.affine, src.affine)
        seg = np.asarray(seg_img.dataobj)
        assert set(np.unique(seg)) <= values
        for name in ("WT", "TC", "ET"):
            assert nib.load(out / f"{case.case_id}_prob_{name}.nii.gz").shape == src.shape
        lc = load_case(case, label_values=ds.label_values)
        res = segment_volume(model, diffusion, torch.from_numpy(preprocess_case(lc, pre).image), method="patchddm",
                             ensemble=2, steps=2, seed=0, progress=False)
        labels = preprocess_case(lc, pre).box.invert(label_map(res.mask.numpy(), layout))
        np.testing.assert_array_equal(seg, labels)
        gt = region_masks(lc.label, layout)
        pred = region_masks(labels, layout)
        for i, name in enumerate(("WT", "TC", "ET")):
            assert by_case[case.case_id][name]["dice"] == pytest.approx(dice(pred[i], gt[i]), abs=1e-12)


def test_multifocal_phantoms_have_separate_lesions():
    from patchddm_fast.data.phantom import make_phantom, make_phantom_dataset
    from patchddm_fast.eval.lesionwise import ground_truth_lesions

    one = make_phantom(32, 1)
    same = make_phantom(32, 1, lesions=1)
    np.testing.assert_array_equal(one.image, same.image)  # lesions=1 is the unchanged phantom
    three = make_phantom(64, 1, lesions=3)
    assert len(np.unique(ground_truth_lesions(three.label))) - 1 == 3  # separate even after 3 dilations
    for region in (three.whole_tumour, three.tumour_core, three.enhancing_tumour):
        assert region.any()
    assert not (three.decoy_mask & three.label).any()
    counts = [len(np.unique(ground_truth_lesions(c.label))) - 1 for c in make_phantom_dataset(8, 48, 0, multifocal=1.0)]
    assert sum(c >= 2 for c in counts) >= 5
    with pytest.raises(ValueError, match="lesions must be 1, 2 or 3"):
        make_phantom(32, 0, lesions=4)
