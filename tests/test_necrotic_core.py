"""Issue 13.1: a trained demo model segments a large necrotic core as tumour (no hole in WT).

The whole tumour (BraTS labels 1, 2, 4) includes the necrotic core.  A model that
leaves the core out predicts a ring: its mask encloses empty voxels, which
``scipy.ndimage.binary_fill_holes`` finds.  This test trains the demo's network with the
demo's recipe (v-prediction, cosine lr, its phantom distribution) at a reduced but real
scale -- 32^3 phantoms, 16^3 patches, 600 steps, one thread: 173 s on the project's 2-core
machine while it was shared (load 4) -- and
segments held-out phantoms whose necrotic core is large (``LARGE_NECROSIS``: a fifth to
a third of the tumour, thin enhancing rim).  Seeds fix data, weights and sampling.

The hole and coverage limits apply to the network's own mask (``fill_holes=False``); the
mask every command writes also fills enclosed gaps (``data.regions.tumour_mask``), the
safeguard for cores that look like CSF (``benchmarks/necrotic_core_look.py``).
"""
import numpy as np
import pytest
import torch
from scipy import ndimage

from patchddm_fast.cli.demo import DEMO_CONFIG
from patchddm_fast.training.cases import pad_case
from patchddm_fast.data.phantom import LARGE_NECROSIS, make_phantom_dataset
from patchddm_fast.data.regions import tumour_mask
from patchddm_fast.eval.metrics import dice
from patchddm_fast.sampling.segment import segment_volume
from patchddm_fast.training.trainer import Trainer

SIZE = 32
MAX_HOLE_VOXELS = 3  # "no enclosed hole larger than a few voxels"


def enclosed_empty_voxels(mask: np.ndarray) -> int:
    """Predicted-empty voxels enclosed by the prediction (holes in 3D)."""
    return int((ndimage.binary_fill_holes(mask) & ~mask).sum())


def test_hole_counter_sees_a_ring_and_not_a_ball():
    z, y, x = np.mgrid[:16, :16, :16] - 7.5
    r = np.sqrt(x * x + y * y + z * z)
    assert enclosed_empty_voxels(r < 6) == 0
    assert enclosed_empty_voxels((r < 6) & (r >= 3)) == int((r < 3).sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)  # fixed rounding: the result must not depend on the core count
    cfg = dict(DEMO_CONFIG, phantom_size=SIZE, patch_size=SIZE // 2, steps=600, ckpt_every=0,
               log_every=0, out_dir=str(tmp_path_factory.mktemp("necrosis")), progress=False, device="cpu",
               resume=False, seed=0)
    train = [pad_case(c.case_id, c.image, c.label, 8)
             for c in make_phantom_dataset(16, SIZE, 0, **DEMO_CONFIG.get("phantom_options", {}))]
    trainer = Trainer(cfg, train_cases=train, val_cases=[])
    trainer.fit()
    return trainer


def test_trained_demo_model_has_no_hole_at_a_large_necrotic_core(trained):
    for case in make_phantom_dataset(2, SIZE, 777, **LARGE_NECROSIS):
        necrosis = case.labels == 1
        assert necrosis.sum() >= 20  # a real core to leave out
        res = segment_volume(trained.model, trained.diffusion, torch.from_numpy(case.image), method="patchddm",
                             ensemble=3, steps=10, seed=0, progress=False)
        pred = tumour_mask(res.mean, 0.5, fill_holes=False).numpy()  # the network's own mask, before filling
        filled = res.mask.numpy()  # what every command writes (holes filled)
        assert (filled >= pred).all() and enclosed_empty_voxels(filled) == 0, case.case_id
        assert dice(pred, case.label) >= 0.6, case.case_id  # a real segmentation, not an empty (hole-free) one
        assert (pred & necrosis).mean() / necrosis.mean() >= 0.9, case.case_id  # the core is in the WT mask
        assert enclosed_empty_voxels(pred) <= MAX_HOLE_VOXELS, case.case_id
