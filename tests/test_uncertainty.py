"""Uncertainty metrics against independent implementations: AUROC (rank closed form) against a
brute-force pairwise count and scipy's Mann-Whitney U; reliability / ECE against a per-voxel
loop; `patchddm evaluate` scores prob/var maps beside predictions."""
import argparse
import json

import numpy as np
import pytest
from scipy import stats

from patchddm_fast.cli import evaluate
from synthetic_data import oblique_affine, save_volume
from patchddm_fast.eval.uncertainty import auroc, pooled_reliability, reliability, uncertainty_metrics


def brute_auroc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pairwise_count_and_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False
    # Few distinct values -> many ties (variance maps are mostly exactly 0).
    scores = rng.integers(0, 4, n).astype(float) if seed % 2 else rng.normal(size=n) + labels
    got = auroc(scores, labels)
    assert got == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    u = stats.mannwhitneyu(scores[labels], scores[~labels], alternative="two-sided").statistic
    assert got == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert auroc([0.9, 0.2, 0.1], [False, False, True]) == 0.0
    assert auroc(np.zeros(5), [True, False, True, False, False]) == 0.5  # all tied: chance
    assert auroc([1.0, 2.0], [False, False]) is None and auroc([1.0, 2.0], [True, True]) is None
    with pytest.raises(ValueError, match="same size"):
        auroc([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="finite"):
        auroc([np.nan, 2.0], [True, False])


def loop_reliability(prob, gt, bins):
    count, psum, gsum = [0] * bins, [0.0] * bins, [0.0] * bins
    for p, g in zip(prob.ravel(), gt.ravel()):
        p = min(max(float(p), 0.0), 1.0)
        b = bins - 1 if p == 1.0 else int(p * bins)
        count[b] += 1
        psum[b] += p
        gsum[b] += float(g)
    ece = sum(c / prob.size * abs(gs / c - ps / c) for c, ps, gs in zip(count, psum, gsum) if c)
    return count, ece


def test_reliability_matches_a_per_voxel_loop():
    rng = np.random.default_rng(0)
    prob = np.concatenate([rng.uniform(-0.03, 1.03, 500), [0.0, 1.0, 0.5, 0.1]])  # clipping and bin edges
    gt = rng.random(prob.size) < np.clip(prob, 0, 1) ** 2
    rel = reliability(prob, gt, bins=7)
    count, ece = loop_reliability(prob, gt, 7)
    assert [b["count"] for b in rel["bins"]] == count
    assert rel["ece"] == pytest.approx(ece, abs=1e-12)


def test_ece_is_small_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    assert reliability(p, rng.random(p.size) < p)["ece"] < 0.01
    assert reliability(p, rng.random(p.size) < p ** 3)["ece"] > 0.2


def test_uncertainty_metrics_and_pooling():
    rng = np.random.default_rng(2)
    gt = np.zeros((6, 6, 6), bool)
    gt[1:4, 1:4, 1:4] = True
    mean = np.where(gt, 0.9, 0.05) + rng.normal(0, 0.05, gt.shape)
    mean[0, 0, :3] = 0.7  # three false positives ...
    var = np.full(gt.shape, 0.01)
    var[0, 0, :3] = 0.2  # ... flagged by the variance
    m = uncertainty_metrics(mean, var, gt)
    assert m["error_voxels"] == 3 and m["auroc_var_error"] == 1.0
    pooled = pooled_reliability([m["reliability"], m["reliability"]])
    assert pooled["ece"] == pytest.approx(m["reliability"]["ece"]) and pooled["n_voxels"] == 2 * gt.size


def test_evaluate_scores_prob_and_var_maps(tmp_path):
    shape, aff = (8, 9, 7), oblique_affine((1.0, 1.0, 1.5))
    rng = np.random.default_rng(3)
    gt = np.zeros(shape, np.uint8)
    gt[2:6, 2:7, 2:5] = 1
    prob = np.clip(gt * 0.8 + rng.uniform(0, 0.3, shape), 0, 1).astype(np.float32)
    seg = (prob > 0.5).astype(np.uint8)
    var = rng.uniform(0, 0.05, shape).astype(np.float32)
    save_volume(gt, aff, tmp_path / "gt" / "c1.nii.gz")
    save_volume(seg, aff, tmp_path / "pred" / "c1_seg.nii.gz")
    save_volume(prob, aff, tmp_path / "pred" / "c1_prob.nii.gz")
    save_volume(var, aff, tmp_path / "pred" / "c1_var.nii.gz")
    save_volume(gt, aff, tmp_path / "gt" / "c2.nii.gz")
    save_volume(gt, aff, tmp_path / "pred" / "c2_seg.nii.gz")  # no maps: no uncertainty for c2
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.json"
    assert evaluate.run(parser.parse_args(["evaluate", "--pred", str(tmp_path / "pred"), "--gt",
                                           str(tmp_path / "gt"), "--out", str(out), "--quiet"])) == 0
    result = json.loads(out.read_text())
    by_case = {c["case"]: c for c in result["cases"]}
    assert "uncertainty" not in by_case["c2"] and result["uncertainty"]["n_cases"] == 1
    expected = uncertainty_metrics(prob, var, gt > 0, pred=seg)
    assert by_case["c1"]["uncertainty"]["auroc_var_error"] == pytest.approx(expected["auroc_var_error"])
    assert by_case["c1"]["uncertainty"]["reliability"]["ece"] == pytest.approx(expected["reliability"]["ece"])
    assert (tmp_path / "m_uncertainty.png").stat().st_size > 1000


def test_sample_writes_uncertainty_with_any_sampler(tmp_path):
    from patchddm_fast.cli.main import main

    model = '{"base_width": 8, "channel_mult": [1, 2], "enc_blocks": 1, "dec_blocks": 2, "mid_blocks": 1, "groups": 4}'
    assert main(["train", "--model", model, "--phantom-size", "8", "--phantom-train", "1", "--phantom-val", "1",
                 "--patch-size", "8", "--steps", "1", "--out-dir", str(tmp_path / "run"), "--progress", "false",
                 "--device", "cpu"]) == 0
    assert main(["sample", "--model", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "s"),
                 "--ensemble", "3", "--sampling-steps", "2", "--sampler", "dpmpp2m", "--member-batch", "2",
                 "--quiet"]) == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    case = metrics["cases"][0]
    assert {"auroc_var_error", "ece", "reliability", "error_voxels"} <= set(case)
    assert metrics["sampling"]["sampler"] == "dpmpp2m" and "ece" in metrics["mean"]
    assert (tmp_path / "s" / "uncertainty.png").stat().st_size > 1000
