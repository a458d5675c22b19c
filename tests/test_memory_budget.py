"""A memory budget reaches what runs: the Trainer and the sampler run the planner's plan.

Budgets are set between what two candidate settings need in the simulator (the planner's
own steady-state simulation), so the planner is forced past the cheapest setting, and the
test checks that the network then really runs with the frugal setting -- and, for
sampling, that the answer is the same as without a budget.
"""
import pytest
import torch

from patchddm_fast import Trainer
from patchddm_fast.analysis import simulate
from patchddm_fast.analysis.planner import DEFAULT_HEADROOM, plan_sampling, planner_arch, required_process_bytes
from patchddm_fast.cli.sample import planner_advice_on_oom
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.execution.policy import ExecutionPlan, ExecutionPolicy
from patchddm_fast.model.unet import ResBlock, UNet3D
from patchddm_fast.sampling.segment import SamplingOutOfMemoryError, segment_volume
from patchddm_fast.training import trainer as training
from test_trainer import TINY_MODEL, random_cases, tiny_config


def _process_bytes(mode, size, arch, **knobs):
    r = simulate("patchddm", mode, size=size, precision="auto", steps=1, warm_start=mode == "train",
                 model_kwargs=arch, **knobs)
    if mode == "sample":
        # The sampler's conditioning temporaries stay cached in an unbounded replay; the planner
        # replays with the budget as capacity, where the allocator releases them: its criterion.
        return required_process_bytes(r)
    return r.peak_reserved_bytes + r.cuda_context_bytes


def _budget_between(cheap, frugal):
    """A budget the frugal setting fits (with the planner's headroom) and the cheap one does not."""
    assert frugal < cheap, "the simulator should rank these settings"
    return int((cheap + frugal) / 2 / (1 - DEFAULT_HEADROOM))


def test_trainer_runs_what_the_planner_chose(tmp_path):
    size = 64
    config = tiny_config(tmp_path, patch_size=size, steps=1, ckpt_every=0)
    arch = planner_arch(config.model)
    budget = _budget_between(_process_bytes("train", size, arch, checkpoint="none"),
                             _process_bytes("train", size, arch, checkpoint="selective"))
    trainer = Trainer(config, memory_budget=budget, train_cases=random_cases(1, size=size), val_cases=[])
    plan = trainer.plan  # patchddm_fast.Trainer asked the planner; the training layer's Trainer ran it
    assert isinstance(trainer, training.Trainer)
    assert plan.predicted_process_bytes <= budget
    assert plan.policy.recompute != "none"
    assert trainer.config.checkpoint == plan.policy.recompute
    assert trainer.config.patch_size == size
    blocks = [m for m in trainer.model.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.recompute != "none" for b in blocks)
    assert len(trainer.fit()["losses"]) == 1


def test_trainer_refuses_a_budget_nothing_fits(tmp_path):
    with pytest.raises(RuntimeError, match="nothing fits"):
        Trainer(tiny_config(tmp_path, patch_size=16), memory_budget="500MB", train_cases=random_cases(1, 16))


def test_sampler_with_a_tight_budget_offloads_and_gives_the_same_result():
    # Wide enough, with two skips per level, that the skips (not the sampler's conditioning)
    # decide what the whole sampler needs at this size.
    size = 96
    torch.manual_seed(0)
    model = UNet3D(in_channels=8, **dict(TINY_MODEL, base_width=16, enc_blocks=2, dec_blocks=3))
    for p in model.parameters():  # non-zero output convolutions: a real denoiser's numbers
        torch.nn.init.normal_(p, std=0.05)
    arch = planner_arch(model.config)
    plain_bytes = _process_bytes("sample", size, arch)
    skips_bytes = _process_bytes("sample", size, arch, offload="skips")
    budget = _budget_between(plain_bytes, skips_bytes)
    image = torch.rand(4, size, size, size, generator=torch.Generator().manual_seed(1))
    diffusion = Diffusion()
    kw = dict(method="patchddm", ensemble=1, steps=2, seed=3, progress=False)
    reference = segment_volume(model, diffusion, image, **kw)
    seen = []
    original_forward = model.forward

    def spy(x, t):  # record what the network runs with during the budgeted sampling
        seen.append(model.policy)
        return original_forward(x, t)

    model.forward = spy
    plan = plan_sampling(model, budget, "patchddm", image.shape)
    assert plan.policy.offload == "skips"
    budgeted = segment_volume(model, diffusion, image, plan=plan, **kw)
    model.forward = original_forward
    assert seen and all(p.offload == "skips" for p in seen)
    assert model.policy == ExecutionPolicy()  # restored afterwards
    torch.testing.assert_close(budgeted.mean, reference.mean, rtol=1e-4, atol=1e-4)


def test_planned_low_precision_holds_the_conditioning_in_that_dtype_bit_identically():
    """With a bf16 plan the sampler keeps the conditioning in bf16 (what the simulator counts);
    under autocast the first convolution rounds its input to bf16 anyway, so the samples equal
    those of fp32 conditioning under the same autocast, bit for bit."""
    torch.manual_seed(0)
    model = UNet3D(in_channels=8, **TINY_MODEL)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    image = torch.rand(4, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(method="patchddm", ensemble=1, steps=2, seed=3, progress=False)
    inputs = []
    model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].dtype))
    plan = ExecutionPlan(ExecutionPolicy(ops="fused"), precision="bf16")
    planned = segment_volume(model, Diffusion(), image, plan=plan, **kw)
    assert inputs and set(inputs) == {torch.bfloat16}
    model.apply_policy(ExecutionPolicy(ops="fused"))  # what the plan ran with
    fp32_cond = segment_volume(model, Diffusion(), image, autocast=torch.autocast("cpu", dtype=torch.bfloat16), **kw)
    assert torch.equal(planned.mean, fp32_cond.mean)


def _raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_sampling_is_answered_with_the_planners_advice(monkeypatch):
    """The sampler names the grid it ran out on; the CLI (not the sampler) asks the planner."""
    model = UNet3D(in_channels=8, **TINY_MODEL)
    monkeypatch.setattr(model, "forward", _raise_oom)
    with pytest.raises(SamplingOutOfMemoryError) as raised:
        segment_volume(model, Diffusion(), torch.rand(4, 8, 8, 8), method="patchddm", ensemble=1, steps=1,
                       progress=False)
    assert (raised.value.method, raised.value.size) == ("patchddm", 8)
    with pytest.raises(RuntimeError, match="CUDA out of memory") as exc:
        with planner_advice_on_oom("patchddm", "sample"):
            raise raised.value
    assert "patchddm plan --gpu-memory" in str(exc.value)  # no GPU here: the planner command to run
    assert "--mode sample" in str(exc.value)


def test_out_of_memory_in_training_is_answered_with_the_planners_advice(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, patch_size=8), train_cases=random_cases(1), val_cases=[])
    monkeypatch.setattr(trainer.model, "forward", _raise_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the Trainer does not plan ...
        trainer.fit()
    with pytest.raises(RuntimeError, match="CUDA out of memory") as exc:  # ... the command does
        with planner_advice_on_oom("patchddm", "train"):
            trainer.fit()
    assert "patchddm plan --gpu-memory" in str(exc.value)


def test_the_package_face_plans_a_sampling_budget(monkeypatch):
    """patchddm_fast.segment_volume(memory_budget=...) asks the planner and hands the plan down;
    without a budget the planner is never called (inference runs no simulator)."""
    import patchddm_fast
    import patchddm_fast.analysis.planner as planner

    calls = []
    real = planner.plan_sampling
    monkeypatch.setattr(planner, "plan_sampling", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = UNet3D(in_channels=8, **TINY_MODEL)
    image = torch.rand(4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(method="patchddm", ensemble=2, steps=1, seed=0, progress=False)
    plain = patchddm_fast.segment_volume(model, Diffusion(), image, **kw)
    assert calls == []
    budgeted = patchddm_fast.segment_volume(model, Diffusion(), image, memory_budget="80GB", **kw)
    assert len(calls) == 1 and calls[0][1:] == ("80GB", "patchddm", (4, 8, 8, 8), 2)
    torch.testing.assert_close(budgeted.mean, plain.mean)
