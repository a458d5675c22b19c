"""Trainer: exact resume, safe atomic checkpoints, config files, validation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from patchddm_fast import Trainer, TrainConfig
from patchddm_fast.training.checkpoint import load_checkpoint, load_for_inference, save_checkpoint
from patchddm_fast.training.cases import pad_case

TINY_MODEL = dict(base_width=8, channel_mult=(1, 2, 2), enc_blocks=1, dec_blocks=2, mid_blocks=1, groups=4)


def random_cases(n, size=12, seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        image = rng.random((4, size, size, size), dtype=np.float32)
        label = rng.random((size, size, size)) > 0.7
        cases.append(pad_case(f"case_{i}", image, label, 4))
    return cases


def tiny_config(tmp_path, **kw):
    base = dict(method="patchddm", model=TINY_MODEL, patch_size=8, steps=6, lr=1e-3, ckpt_every=3, log_every=1,
                out_dir=str(tmp_path / "run"), progress=False, device="cpu", val_steps=2)
    return TrainConfig.from_dict({**base, **kw})


@pytest.mark.parametrize("method", ["patchddm", "halfres", "fullres"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, method):
    cases = random_cases(3, size=16 if method == "halfres" else 12)
    full = Trainer(tiny_config(tmp_path / "a", method=method), train_cases=cases, val_cases=[]).fit()["losses"]
    Trainer(tiny_config(tmp_path / "b", method=method, steps=3), train_cases=cases, val_cases=[]).fit()
    resumed = Trainer(tiny_config(tmp_path / "b", method=method, steps=6), train_cases=cases, val_cases=[])
    losses = resumed.fit()["losses"]
    assert len(full) == 6 and losses == full  # bit-exact: every step's randomness depends only on (seed, step)
    assert len(set(full)) > 1
    log = [json.loads(l) for l in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_training_reduces_loss_and_validates(tmp_path):
    cases = random_cases(2)
    t = Trainer(tiny_config(tmp_path, steps=40, ckpt_every=0, val_every=20), train_cases=cases, val_cases=cases[:1])
    hist = t.fit()
    assert np.mean(hist["losses"][-10:]) < np.mean(hist["losses"][:10])
    assert [v["step"] for v in hist["validations"]] == [20, 40]
    assert all(0.0 <= v["dice"] <= 1.0 for v in hist["validations"])


def test_checkpoint_is_weights_only_and_loads_for_inference(tmp_path):
    cases = random_cases(1)
    t = Trainer(tiny_config(tmp_path, steps=2), train_cases=cases, val_cases=[])
    t.fit()
    ckpt = tmp_path / "run" / "last.pt"
    payload = torch.load(ckpt, weights_only=True)  # raises if anything but plain data was pickled
    assert payload["step"] == 2
    model, diffusion, config = load_for_inference(ckpt)
    for (k, a), b in zip(t.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert config["method"] == "patchddm" and diffusion.timesteps == 1000


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, dict(model={"w": torch.ones(2)}, step=1), dict(method="patchddm"))
    before = path.read_bytes()

    def explode(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, dict(model={"w": torch.zeros(2)}, step=2), dict(method="patchddm"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_damaged_checkpoint_error_names_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)


def test_config_files_and_unknown_keys(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(dict(steps=7, model=dict(base_width=16))))
    (tmp_path / "c.yaml").write_text("steps: 9\nlr: 0.001\n")
    assert TrainConfig.from_file(tmp_path / "c.json").model["base_width"] == 16
    assert TrainConfig.from_file(tmp_path / "c.yaml").lr == 1e-3
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict(dict(stepz=3))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        TrainConfig.from_file(tmp_path / "broken.json")


def test_paper_defaults():
    c = TrainConfig()
    assert (c.lr, c.weight_decay, c.batch_size, c.patch_size) == (1e-5, 0.0, 1, 128)
    assert c.diffusion == dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_x0=True)


def test_resume_after_a_crash_follows_the_cosine_schedule_exactly(tmp_path):
    """A run killed mid-way (after its step-3 checkpoint) and resumed with the same config gives
    the uninterrupted run's losses: the learning rate is a function of the step alone."""
    cases = random_cases(2)
    kw = dict(lr_schedule="cosine", warmup_steps=2)
    full = Trainer(tiny_config(tmp_path / "a", **kw), train_cases=cases, val_cases=[]).fit()["losses"]

    crashing = Trainer(tiny_config(tmp_path / "b", **kw), train_cases=cases, val_cases=[])
    real_step = crashing.train_step

    def step_then_crash(sampler):
        if crashing.step == 4:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")
        return real_step(sampler)

    crashing.train_step = step_then_crash
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    resumed = Trainer(tiny_config(tmp_path / "b", **kw), train_cases=cases, val_cases=[]).fit()["losses"]
    assert resumed == full and len(full) == 6


def test_learning_rate_schedules_in_closed_form():
    import math

    from patchddm_fast.training.schedule import learning_rate

    assert [learning_rate(1.0, s, 10) for s in range(10)] == [1.0] * 10
    assert [learning_rate(1.0, s, 10, "constant", warmup=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [learning_rate(2.0, s, 7, "cosine", warmup=2) for s in range(7)]
    assert cos[:2] == [1.0, 2.0]
    expected = [2.0 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 7)]
    assert cos[2:] == pytest.approx(expected, abs=1e-12) and cos[-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        learning_rate(1.0, 0, 10, "linear")


def test_every_checkpoint_stores_the_effective_preprocessing(tmp_path):
    """Issue 13.3: a run trained with default preprocessing stores the defaults (with the
    network's size multiple) in its checkpoint, and explicit settings keep their values."""
    from patchddm_fast.data.preprocess import PreprocessConfig

    cases = random_cases(2)
    Trainer(tiny_config(tmp_path / "a", steps=1), train_cases=cases, val_cases=[]).fit()
    _, config = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    assert config["preprocess"] == PreprocessConfig(multiple=4).to_dict()  # the 3-level tiny net's multiple
    Trainer(tiny_config(tmp_path / "b", steps=1, preprocess={"upper_percentile": 99.0}), train_cases=cases,
            val_cases=[]).fit()
    _, config = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert config["preprocess"] == PreprocessConfig(multiple=4, upper_percentile=99.0).to_dict()


def test_lr_schedule_sets_the_closed_form_lr_of_every_step_and_resumes_exactly(tmp_path):
    """The LRScheduler sets, before each optimiser step k, exactly learning_rate(lr, k, ...) (the
    value the trainer used to write on the param groups by hand); its position is in the
    checkpoint, and a resume with a new --lr continues the schedule with the new base."""
    from patchddm_fast.training.schedule import learning_rate

    cases = random_cases(2)
    kw = dict(lr_schedule="cosine", warmup_steps=2, steps=6, ckpt_every=3)

    def run(trainer):
        seen = []
        trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
        trainer.fit()
        return seen

    full = run(Trainer(tiny_config(tmp_path / "a", **kw), train_cases=cases, val_cases=[]))
    assert full == [learning_rate(1e-3, k, 6, "cosine", 2) for k in range(6)]  # bit for bit
    assert full[:3] == [0.0005, 0.001, 0.001] and full[-1] == 0.0
    run(Trainer(tiny_config(tmp_path / "b", **dict(kw, steps=3)), train_cases=cases, val_cases=[]))
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["schedule"] == dict(last_epoch=3)
    resumed = run(Trainer(tiny_config(tmp_path / "b", **kw), train_cases=cases, val_cases=[]))
    assert resumed == full[3:]
    lower = run(Trainer(tiny_config(tmp_path / "b", **dict(kw, steps=7, lr=1e-4)), train_cases=cases, val_cases=[]))
    assert lower == [learning_rate(1e-4, 6, 7, "cosine", 2)]


def test_the_trainer_and_the_simulator_run_the_one_train_step(tmp_path, monkeypatch):
    """diffusion.steps.train_step is the only training step: the Trainer and the memory
    simulator both call that function object, and gradient clipping and the lr schedule
    are part of it (the Trainer passes its own)."""
    from patchddm_fast.analysis import simulate
    from patchddm_fast.diffusion import steps
    from patchddm_fast.training.schedule import StepSchedule

    calls = []
    real = steps.train_step

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", spy)
    trainer = Trainer(tiny_config(tmp_path, steps=1, ckpt_every=0, grad_clip=0.5), train_cases=random_cases(1),
                      val_cases=[])
    trainer.fit()
    assert len(calls) == 1 and calls[0]["grad_clip"] == 0.5 and calls[0]["schedule"] is trainer.schedule
    simulate("patchddm", "train", size=8, steps=1, model_kwargs=dict(TINY_MODEL, base_width=4, groups=2))
    assert len(calls) == 2  # the simulator's step is the same function

    # Clipping and the schedule's advance happen inside the one step.
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = StepSchedule(optimizer, 1.0, 4, "constant", warmup=2)
    assert optimizer.param_groups[0]["lr"] == 0.5

    class Loss:
        def training_loss(self, net, cond, x0, t, noise, build_input):
            return (net(build_input(cond, x0)) * 1e3).pow(2).mean()

    inputs = dict(cond=torch.randn(1, 1, 2, 2, 2), x0=torch.randn(1, 1, 2, 2, 2), t=torch.zeros(1), noise=None)
    real(model, Loss(), optimizer, trainer.precision, inputs, grad_clip=0.25, schedule=schedule)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert float(norm) == pytest.approx(0.25, rel=1e-5)
    assert schedule.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 1.0
