"""PNG figures: slice placement, inputs accepted by the demo, and the summary plot."""
import numpy as np
import pytest
import torch

from patchddm_fast.eval.figures import case_figure, montage, summary_figure, tumour_centre

SHAPE = (20, 24, 16)


def _blob(centre, r=3):
    g = np.indices(SHAPE)
    return sum((g[i] - c) ** 2 for i, c in enumerate(centre)) <= r * r


def test_tumour_centre_prefers_gt_then_prediction():
    gt, pred = _blob((5, 6, 7)), _blob((14, 17, 9))
    assert tumour_centre(gt, pred.astype(float)) == (5, 6, 7)
    assert tumour_centre(None, pred.astype(float)) == (14, 17, 9)
    assert tumour_centre(np.zeros(SHAPE, bool), np.zeros(SHAPE)) == (10, 12, 8)


def test_case_figure_and_montage(tmp_path):
    rng = np.random.default_rng(0)
    flair = rng.random(SHAPE).astype(np.float32)
    gt = _blob((8, 10, 6))
    prob = np.clip(gt + rng.normal(0, 0.1, SHAPE), 0, 1).astype(np.float32)
    var = (prob * (1 - prob)).astype(np.float32)
    p = case_figure(flair, gt, prob, var, tmp_path / "a" / "case.png", title="t", spacing=(1, 1, 1.5))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert case_figure(flair, None, prob, var, tmp_path / "nogt.png").is_file()
    image = torch.from_numpy(np.stack([flair] * 4))
    assert montage(image, torch.from_numpy(gt), torch.from_numpy(prob), torch.from_numpy(var),
                   tmp_path / "m.png").is_file()
    with pytest.raises(ValueError, match="gt has shape"):
        case_figure(flair, gt[:-1], prob, var, tmp_path / "bad.png")


def test_summary_figure_accepts_evaluate_and_sample_metrics(tmp_path):
    evaluate_style = {"regions": {"WT": [1, 2, 4], "TC": [1, 4]},
                      "cases": [{"case": "a", "WT": {"dice": 0.9, "hd95": 3.0}, "TC": {"dice": 0.0, "hd95": None}},
                                {"case": "b", "WT": {"dice": 0.8, "hd95": 5.0}, "TC": {"dice": 0.7, "hd95": 4.0}}]}
    sample_style = {"cases": [{"case": "a", "dice": 0.9, "hd95": None}, {"case": "b", "dice": 0.5, "hd95": 2.0}]}
    assert summary_figure(evaluate_style, tmp_path / "e.png").stat().st_size > 5_000
    assert summary_figure(sample_style, tmp_path / "s.png").stat().st_size > 5_000


def test_prediction_figure_without_ground_truth_shows_t1ce_or_drops_the_column(tmp_path):
    """Issue 13.2: no ground truth -> the second column shows another modality (not FLAIR under
    a 'no ground truth' label), or the figure has three columns when there is none."""
    from matplotlib.image import imread

    from patchddm_fast.eval.figures import figure_columns

    assert figure_columns(True, "T1ce")[1] == "ground truth"
    assert figure_columns(False, "T1ce")[1] == "T1ce (no ground truth)"
    assert figure_columns(False, None) == ["FLAIR", "prediction (mean, contour 0.5)", "variance"]
    rng = np.random.default_rng(1)
    flair = rng.random(SHAPE).astype(np.float32)
    prob = _blob((8, 10, 6)).astype(np.float32)
    var = (prob * 0.1).astype(np.float32)
    three = imread(case_figure(flair, None, prob, var, tmp_path / "three.png"))
    ramp = np.broadcast_to(np.linspace(0.1, 1, SHAPE[0], dtype=np.float32)[:, None, None], SHAPE)
    a = imread(case_figure(flair, None, prob, var, tmp_path / "a.png", second=ramp))
    b = imread(case_figure(flair, None, prob, var, tmp_path / "b.png", second=ramp[::-1]))
    assert three.shape[1] * 4 == a.shape[1] * 3  # a column fewer, same column width
    col = a.shape[1] // 4
    assert np.array_equal(a[:, :col], b[:, :col])  # FLAIR column unchanged
    assert not np.array_equal(a[:, col:2 * col], b[:, col:2 * col])  # the second column is the given modality
    with pytest.raises(ValueError, match="second has shape"):
        case_figure(flair, None, prob, var, tmp_path / "bad.png", second=ramp[:-1])
