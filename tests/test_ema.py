"""The weights' exponential moving average (``ema_decay``): the recursion, exact resume, and
prediction from the averaged weights."""
import pytest
import torch

from patchddm_fast import Trainer
from patchddm_fast.core.validation import ConfigError
from patchddm_fast.training.cases import BatchSampler
from patchddm_fast.training.checkpoint import load_checkpoint, load_for_inference

from test_trainer import random_cases, tiny_config


def test_ema_follows_the_recursion_from_the_trained_weights(tmp_path):
    """Independent reference: a float64 EMA over snapshots of the weights after every step
    (the first step copies, then ema <- d * ema + (1 - d) * w)."""
    decay = 0.8
    cases = random_cases(2)
    t = Trainer(tiny_config(tmp_path, ema_decay=decay, steps=4), train_cases=cases, val_cases=[])
    sampler = BatchSampler(cases, "patchddm", 8, "trapezoid")
    expected = None
    for _ in range(4):
        t.train_step(sampler)
        w = {k: v.detach().double().clone() for k, v in t.model.state_dict().items()}
        expected = w if expected is None else {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
    averaged = t.ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k].double(), v, rtol=1e-6, atol=1e-7)
    moved = [k for k in expected if not torch.equal(averaged[k], t.model.state_dict()[k])]
    assert moved, "after several steps the average differs from the last weights"


def test_resume_keeps_the_average_exactly(tmp_path):
    cases = random_cases(2)
    straight = Trainer(tiny_config(tmp_path / "a", ema_decay=0.9), train_cases=cases, val_cases=[])
    straight.fit()
    Trainer(tiny_config(tmp_path / "b", ema_decay=0.9, steps=3), train_cases=cases, val_cases=[]).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", ema_decay=0.9), train_cases=cases, val_cases=[])
    resumed.fit()
    a, b = straight.ema.state_dict(), resumed.ema.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prediction_samples_with_the_average(tmp_path):
    cases = random_cases(1)
    t = Trainer(tiny_config(tmp_path, ema_decay=0.5, steps=3), train_cases=cases, val_cases=[])
    t.fit()
    assert t.inference_model is t.ema.module
    model, _, _ = load_for_inference(tmp_path / "run" / "last.pt")
    averaged = t.ema.module.state_dict()
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())


def test_off_by_default_and_checked(tmp_path):
    cases = random_cases(1)
    t = Trainer(tiny_config(tmp_path, steps=1), train_cases=cases, val_cases=[])
    t.fit()
    assert t.ema is None and t.inference_model is t.model
    state, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert "ema" not in state
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ema_decay"):
            tiny_config(tmp_path, ema_decay=bad)
    # a run started without an average cannot silently resume with one
    with pytest.raises(ValueError, match="no weight average"):
        Trainer(tiny_config(tmp_path, steps=2, ema_decay=0.9), train_cases=cases, val_cases=[]).fit()
