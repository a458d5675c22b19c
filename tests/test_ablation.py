"""benchmarks/ablation.py and the demo's train-and-score path, at toy scale (no claim on quality)."""
import importlib.util
import json
from pathlib import Path

import numpy as np

from patchddm_fast.cli.demo import DEMO_CONFIG, train_and_evaluate
from patchddm_fast.data.phantom import make_phantom_dataset
from patchddm_fast.training.sources import VALIDATION_SEED_OFFSET

ROOT = Path(__file__).resolve().parents[1]


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_equal_voxel_budget():
    ab = _ablation()
    patch = ab.variant_config("patchddm", 2500, 0, 4)
    full = ab.variant_config("fullres", 2500, 0, 4)
    assert patch["steps"] == 2500 and ab.variant_config("patches", 2500, 0, 4)["method"] == "patches"
    ratio = (DEMO_CONFIG["patch_size"] / DEMO_CONFIG["phantom_size"]) ** 3
    assert full["steps"] * DEMO_CONFIG["phantom_size"] ** 3 == round(2500 * ratio) * DEMO_CONFIG["phantom_size"] ** 3
    assert abs(full["steps"] * DEMO_CONFIG["phantom_size"] ** 3 - 2500 * DEMO_CONFIG["patch_size"] ** 3) \
        <= DEMO_CONFIG["phantom_size"] ** 3


def test_train_and_score_and_decoy_counts(tmp_path):
    """One tiny training per method; decoy/other false positives recounted from the written masks."""
    ab = _ablation()
    import nibabel as nib

    for method in ("patches", "fullres"):
        cfg = dict(DEMO_CONFIG, method=method, model=dict(base_width=8, channel_mult=(1, 2), enc_blocks=1,
                   dec_blocks=2, mid_blocks=1, groups=4), phantom_size=16, phantom_train=2, phantom_val=1,
                   patch_size=8, steps=2, warmup_steps=1, ckpt_every=0, log_every=1, ops="reference", device="cpu")
        folder = tmp_path / method
        m = train_and_evaluate(cfg, folder, ensemble=1, sampling_steps=2, sampling_seed=0, progress=False)
        assert m["trained_steps"] == 2 and json.loads((folder / "metrics.json").read_text())["timing_s"]["train"] >= 0
        rows = ab.decoy_scores(m, folder, cfg)
        ph = make_phantom_dataset(1, 16, VALIDATION_SEED_OFFSET)[0]
        seg = np.asarray(nib.load(str(folder / f"{ph.case_id}_seg.nii.gz")).dataobj) > 0
        assert rows[0]["decoy_fp"] == int((seg & ph.decoy_mask).sum())
        assert rows[0]["other_fp"] + rows[0]["decoy_fp"] == int((seg & ~ph.label).sum())
        assert rows[0]["fn"] == int((~seg & ph.label).sum()) and rows[0]["decoy_voxels"] == int(ph.decoy_mask.sum())
    md = ab.markdown([dict(method="patches", seed=0, steps=2, dice=0.5, dice_single_sample=0.4, decoy_fp=3,
                           decoy_voxels=9, other_fp=1, train_s=1.0)], dict(date="d", command="c"))
    assert "| patches | 0 | 2 | 0.500 | 0.400 | 3 (9) | 1 | 1 |" in md
