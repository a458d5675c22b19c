"""Samplers: DPM-Solver++(2M) and Heun against DDIM and against the exact probability-flow
ODE solution for Gaussian data; determinism; network calls counted; batched ensemble members
equal to one-at-a-time sampling, which itself equals the code before batching existed."""
import math

import pytest
import torch

from patchddm_fast.model.conditioning import condition, network_input
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.unet import UNet3D
from patchddm_fast.diffusion.samplers import SAMPLERS, nfe, sample_loop, solver_timesteps, steps_for_nfe
from patchddm_fast.sampling.segment import member_batch_for, segment_volume

TINY = dict(base_width=8, channel_mult=(1, 2), enc_blocks=1, dec_blocks=2, mid_blocks=1, groups=4)
DATA_STD = 0.3


def ideal_network(diffusion: Diffusion, kind: str):
    """The ideal network output for known data, in the diffusion's prediction type.

    gauss: x0 ~ N(0, DATA_STD^2) per voxel, E[x0 | x_t] = sqrt(a) s^2 / (a s^2 + 1 - a) x_t;
    binary: x0 = +-1 with P(+1) = sigmoid(0.6), E[x0 | x_t] = tanh(sqrt(a) x_t / (1 - a) + 0.3)."""

    def model(x, t):
        a = diffusion.alpha_bar(t, x)
        if kind == "gauss":
            x0 = a.sqrt() * DATA_STD ** 2 / (a * DATA_STD ** 2 + 1 - a) * x
        else:
            x0 = torch.tanh(a.sqrt() * x / (1 - a) + 0.3)
        return diffusion.target(x0, t, diffusion.eps_from_x0(x, t, x0))

    return model


def run(diffusion, sampler, model, noise, steps):
    x = None
    for x in sample_loop(diffusion, sampler, model, noise.clone(), steps):
        pass
    return x


def noise64(seed=0):
    return torch.randn(3, 1, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_every_sampler_converges_to_the_exact_flow_of_gaussian_data(prediction):
    # For x0 ~ N(0, s^2) the probability-flow ODE is linear and keeps the marginal
    # N(0, a s^2 + 1 - a), so its solution from t = T-1 to t = 0 scales x by the ratio of std's.
    diffusion = Diffusion(prediction=prediction, clip_x0=False)
    model = ideal_network(diffusion, "gauss")
    noise = noise64()
    a = diffusion.alphas_cumprod
    exact = noise * math.sqrt(a[0] * DATA_STD ** 2 + 1 - a[0]) / math.sqrt(a[-1] * DATA_STD ** 2 + 1 - a[-1])
    err = lambda sampler, steps: float((run(diffusion, sampler, model, noise, steps) - exact).abs().max())
    # DDIM is first order: error ~ 1/steps.
    assert err("ddim", 999) < 0.006 and 0.3 < err("ddim", 999) / err("ddim", 100) * 10 < 1.5
    # DPM-Solver++(2M) and Heun are second order: doubling the steps divides the error by ~4.
    e200, e400 = err("dpmpp2m", 200), err("dpmpp2m", 400)
    assert e400 < 0.003 and e400 / e200 < 0.35
    h100, h300 = err("heun", 100), err("heun", 300)
    assert h300 < 0.0012 and h300 / h100 < 0.2
    assert err("dpmpp2m", 998) < 4e-4


def test_dpmpp2m_with_many_steps_converges_to_the_ddim_result():
    # Binary (segmentation-like) data, x0 clamped as in sampling; no closed form, so compare.
    diffusion = Diffusion(prediction="v")
    model = ideal_network(diffusion, "binary")
    noise = noise64(1)
    ddim = run(diffusion, "ddim", model, noise, 999)
    for sampler, few, many in (("dpmpp2m", 10, 500), ("heun", 10, 200)):
        far = float((run(diffusion, sampler, model, noise, few) - ddim).abs().max())
        near = float((run(diffusion, sampler, model, noise, many) - ddim).abs().max())
        assert near < 3e-3 < 0.05 < far, (sampler, near, far)


def test_first_dpmpp_step_is_a_ddim_step():
    diffusion = Diffusion(prediction="eps")
    model = ideal_network(diffusion, "binary")
    noise = noise64(2)
    ts = solver_timesteps(diffusion.timesteps, 1)
    x_dpm = run(diffusion, "dpmpp2m", model, noise, 1)
    tt = torch.full((3,), ts[0], dtype=torch.long)
    x_ddim, _ = diffusion.ddim_step(noise, ts[0], ts[1], model(noise, tt))
    torch.testing.assert_close(x_dpm, x_ddim, rtol=1e-12, atol=1e-12)


def test_nfe_bookkeeping():
    assert [nfe("ddim", s) for s in (1, 4)] == [1, 4] and [nfe("dpmpp2m", s) for s in (1, 4)] == [1, 4]
    assert [nfe("heun", s) for s in (1, 2, 5)] == [1, 3, 9]
    assert [steps_for_nfe("heun", b) for b in (1, 2, 4, 20)] == [1, 1, 2, 10]
    assert steps_for_nfe("dpmpp2m", 4) == 4
    with pytest.raises(ValueError, match="sampler must be one of"):
        nfe("euler", 3)
    with pytest.raises(ValueError, match="steps must be in"):
        solver_timesteps(1000, 1000)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = UNet3D(in_channels=8, **TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


class CountingModel(torch.nn.Module):
    """Wraps a network and counts its calls (and the batch of each)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.batches, self.timesteps = inner, 0, [], []
        self.size_multiple = inner.size_multiple

    def forward(self, x, t):
        self.calls += 1
        self.batches.append(x.shape[0])
        self.timesteps.append(t.tolist())
        return self.inner(x, t)


IMAGE = torch.rand(4, 4, 3, 3, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 3])
def test_network_calls_are_counted_exactly(sampler, steps):
    model = CountingModel(tiny_model())
    segment_volume(model, Diffusion(prediction="v"), IMAGE, method="patchddm", ensemble=2, steps=steps,
                   progress=False, sampler=sampler, member_batch=1)
    assert model.calls == 2 * nfe(sampler, steps) == 2 * {"heun": 2 * steps - 1}.get(sampler, steps)
    assert all(0 <= t[0] <= 999 for t in model.timesteps)
    model.calls = 0
    segment_volume(model, Diffusion(prediction="v"), IMAGE, method="patchddm", ensemble=3, steps=steps,
                   progress=False, sampler=sampler, member_batch=3)
    assert model.calls == nfe(sampler, steps) and model.batches[-1] == 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_is_deterministic_at_a_fixed_seed(sampler):
    model, diffusion = tiny_model(), Diffusion(prediction="v")
    kw = dict(method="patchddm", ensemble=2, steps=2, progress=False, keep_samples=True, sampler=sampler)
    a = segment_volume(model, diffusion, IMAGE, seed=7, **kw)
    b = segment_volume(model, diffusion, IMAGE, seed=7, **kw)
    c = segment_volume(model, diffusion, IMAGE, seed=8, **kw)
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)
    assert not torch.equal(a.samples[0], a.samples[1])


def old_sequential(model, diffusion, image, ensemble, steps, seed, eta):
    """segment_volume's member loop as it was before samplers and batching (reference)."""
    cond = condition(image, "patchddm")[None]
    grid = (1, 1, *cond.shape[-3:])
    gen = torch.Generator().manual_seed(seed)
    fn = lambda x, t: model(network_input(cond, x), t).float()
    out = []
    with torch.no_grad():
        for _ in range(ensemble):
            x = None
            for _, x, _ in diffusion.ddim_loop(fn, grid, steps, eta=eta, generator=gen):
                pass
            out.append(x[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_one_at_a_time_ddim_is_bit_identical_to_the_code_before_batching(eta):
    model, diffusion = tiny_model(), Diffusion(prediction="v")
    image = torch.rand(4, 4, 4, 4, generator=torch.Generator().manual_seed(4))  # already a multiple of 2
    model.eval()
    ref = old_sequential(model, diffusion, image, 3, 4, 11, eta)
    res = segment_volume(model, diffusion, image, method="patchddm", ensemble=3, steps=4, seed=11, eta=eta,
                         progress=False, keep_samples=True)  # default member batch on CPU
    assert torch.equal(res.samples, ref)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batched_members_match_one_at_a_time_and_stay_independent(sampler):
    model, diffusion = tiny_model(), Diffusion(prediction="v")
    kw = dict(method="patchddm", ensemble=4, steps=2, seed=2, progress=False, keep_samples=True, sampler=sampler)
    one = segment_volume(model, diffusion, IMAGE, member_batch=1, **kw)
    for batch in (3, 4):  # 3: a full batch and a remainder of one
        together = segment_volume(model, diffusion, IMAGE, member_batch=batch, **kw)
        # Same noise per member; only the convolutions' summation order may differ with the batch.
        torch.testing.assert_close(together.samples, one.samples, rtol=0, atol=1e-4)
    assert all(not torch.equal(one.samples[i], one.samples[j]) for i in range(4) for j in range(i))
    # The k-member ensemble is the first k members of a larger one (same seed).
    three = segment_volume(model, diffusion, IMAGE, member_batch=1, **dict(kw, ensemble=3))
    assert torch.equal(three.samples, one.samples[:3])


def test_member_batch_choice():
    assert member_batch_for(5, device="cpu") == 1  # CPU default keeps the published numbers bit-identical
    assert member_batch_for(5, requested=8) == 5 and member_batch_for(5, requested=2) == 2
    assert member_batch_for(5, eta=0.5, device="cuda") == 1
    with pytest.raises(ValueError, match="needs eta = 0"):
        member_batch_for(5, eta=0.5, requested=2)
    with pytest.raises(ValueError, match="deterministic"):
        list(sample_loop(Diffusion(), "heun", lambda x, t: x, torch.zeros(1, 1, 2, 2, 2), 2, eta=0.5))


def test_planner_picks_the_largest_member_batch_that_fits():
    from patchddm_fast.analysis import fits_budget, plan, simulate
    from patchddm_fast.analysis.planner import execution_plan, max_sample_batch, planner_arch

    net = UNet3D.from_method("patchddm", base_width=8, channel_mult=(1, 2, 2), groups=4)
    arch = planner_arch(net.config)

    def process(batch, settings):
        r = simulate("patchddm", "sample", size=32, precision=settings["precision"], checkpoint="none",
                     offload=settings["offload"], tiled=settings["tiled"], batch=batch, steps=1, warm_start=True,
                     model_kwargs=arch)
        return fits_budget(r, 10 ** 12, 0.0)[1]

    roomy = plan("1TB", method="patchddm", mode="sample", size=32, headroom=0.0, model_kwargs=arch)
    assert max_sample_batch(roomy, net, "patchddm", 32, 5) == 5
    two, three = process(2, roomy.settings), process(3, roomy.settings)
    assert two < three
    tight = plan((two + three) // 2, method="patchddm", mode="sample", size=32, headroom=0.0, model_kwargs=arch)
    assert tight.fits and tight.settings == roomy.settings
    assert max_sample_batch(tight, net, "patchddm", 32, 5) == 2
    planned = execution_plan(tight, member_batch=max_sample_batch(tight, net, "patchddm", 32, 5))
    assert member_batch_for(5, plan=planned) == 2
    assert member_batch_for(1, plan=planned) == 1 and member_batch_for(5, plan=planned, requested=3) == 3
