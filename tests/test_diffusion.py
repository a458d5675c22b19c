"""Diffusion schedule, forward process and DDIM against closed forms."""
import numpy as np
import pytest
import torch

from patchddm_fast.diffusion.schedule import Diffusion


def test_linear_schedule_closed_form():
    d = Diffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(d.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 11, 20, 100, 1000])
def test_ddim_timesteps_formula(steps):
    ts = Diffusion().ddim_timesteps(steps)
    expected = [int(round(v)) for v in np.linspace(999, 0, steps)]
    assert ts == expected and len(ts) == steps and ts[0] == 999
    assert all(isinstance(t, int) for t in ts)
    if steps > 1:
        assert ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))


def test_ddim_timesteps_rejects_bad_counts():
    with pytest.raises(ValueError):
        Diffusion().ddim_timesteps(0)
    with pytest.raises(ValueError):
        Diffusion().ddim_timesteps(1001)


def test_q_sample_moments():
    d = Diffusion()
    x0 = torch.ones(200_000, dtype=torch.float64)
    t = torch.full((1,), 300)
    xt = d.q_sample(x0[None], t, torch.randn(1, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = float(d.alphas_cumprod[300])
    assert abs(xt.mean().item() - np.sqrt(a)) < 0.01
    assert abs(xt.var().item() - (1 - a)) < 0.01


@pytest.mark.parametrize("steps", [3, 10, 50])
def test_ddim_with_true_noise_recovers_x0(steps):
    """If the model returns the true noise, every x0 prediction is x0 and x_t stays on q(x_t|x0)."""
    d = Diffusion()
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.rand(1, 1, 6, 5, 4, generator=gen, dtype=torch.float64) > 0.5).double()
    eps_true = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    start = d.q_sample(x0, torch.tensor([999]), eps_true)

    def oracle(x_t, t):
        return eps_true  # the exact noise of the deterministic trajectory

    x0_preds = []
    for t, x, x0_pred in d.ddim_loop(oracle, x0.shape, steps, noise=start.clone()):
        x0_preds.append(x0_pred)
        torch.testing.assert_close(x0_pred, x0, rtol=0, atol=1e-9)
    a0 = float(d.alphas_cumprod[0])
    torch.testing.assert_close(x, np.sqrt(a0) * x0 + np.sqrt(1 - a0) * eps_true, rtol=0, atol=1e-9)
    assert ((x > 0.5) == (x0 > 0.5)).all()
    assert len(x0_preds) == steps


def test_ddim_clamps_x0_and_rederives_eps():
    d = Diffusion()
    x_t = torch.full((1, 1, 2, 2, 2), 3.0, dtype=torch.float64)
    eps = torch.zeros_like(x_t)
    x_prev, x0 = d.ddim_step(x_t, 500, 400, eps)
    assert torch.all(x0 == 1.0)
    a_t, a_p = float(d.alphas_cumprod[500]), float(d.alphas_cumprod[400])
    eps_re = (3.0 - np.sqrt(a_t) * 1.0) / np.sqrt(1 - a_t)
    torch.testing.assert_close(x_prev, torch.full_like(x_t, np.sqrt(a_p) + np.sqrt(1 - a_p) * eps_re))


def test_eta_adds_the_ddim_sigma_noise():
    d = Diffusion()
    x_t = torch.zeros(1, 1, 40, 40, 40, dtype=torch.float64)
    eps = torch.zeros_like(x_t)
    x_prev, _ = d.ddim_step(x_t, 500, 300, eps, eta=1.0, generator=torch.Generator().manual_seed(0))
    a_t, a_p = float(d.alphas_cumprod[500]), float(d.alphas_cumprod[300])
    sigma = np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
    assert abs(x_prev.std().item() - sigma) / sigma < 0.02
    det, _ = d.ddim_step(x_t, 500, 300, eps, eta=0.0)
    assert torch.count_nonzero(det) == 0


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("steps", [3, 10])
def test_ddim_with_the_true_target_recovers_x0_for_every_parameterisation(prediction, steps):
    """The oracle returns the closed-form target for the trajectory's own x_t (float64):
    v = sqrt(a) eps - sqrt(1 - a) x0, or x0 itself; every x0 prediction must be x0."""
    d = Diffusion(prediction=prediction)
    gen = torch.Generator().manual_seed(2)
    x0 = (torch.rand(1, 1, 5, 4, 3, generator=gen, dtype=torch.float64) > 0.5).double()
    start = torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    def oracle(x_t, t):
        a = float(d.alphas_cumprod[int(t[0])])
        eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)  # the noise that x_t carries
        return np.sqrt(a) * eps - np.sqrt(1 - a) * x0 if prediction == "v" else x0

    for _, x, x0_pred in d.ddim_loop(oracle, x0.shape, steps, noise=start.clone()):
        torch.testing.assert_close(x0_pred, x0, rtol=0, atol=1e-9)
    assert ((x > 0.5) == (x0 > 0.5)).all()


def test_training_targets_in_closed_form():
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.rand(2, 1, 3, 3, 3, generator=gen) > 0.5).double()
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([10, 900])
    a = Diffusion().alphas_cumprod[t].reshape(2, 1, 1, 1, 1)
    assert torch.equal(Diffusion(prediction="eps").target(x0, t, noise), noise)
    assert torch.equal(Diffusion(prediction="x0").target(x0, t, noise), x0)
    v = Diffusion(prediction="v")
    torch.testing.assert_close(v.target(x0, t, noise), a.sqrt() * noise - (1 - a).sqrt() * x0)
    x_t = v.q_sample(x0, t, noise)
    torch.testing.assert_close(v.x0_from_output(x_t, t, v.target(x0, t, noise)), x0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        Diffusion(prediction="score")
