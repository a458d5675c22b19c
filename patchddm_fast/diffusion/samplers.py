"""Probability-flow ODE samplers beside the paper's DDIM: DPM-Solver++(2M) and Heun (EDM).

All three integrate the same deterministic trajectory from pure noise at t = T - 1 to the
schedule's first step t = 0 (alpha_bar_0), so with many steps they agree (tests check this
against each other and against the exact solution for Gaussian data).  The list of samplers
lives here (:data:`SAMPLERS`); the CLI, the sampler and the NFE sweep read it.

Like diffusers' schedulers, DPM-Solver++ and Heun know nothing about the network: they take
``denoise(x_t, t) -> x0 estimate`` (:func:`denoiser` builds it from a network and a
:class:`~patchddm_fast.diffusion.schedule.Diffusion`, reading eps / v / x0 outputs and clamping x0 as
DDIM does) and the schedule ``alphas_cumprod``.  DDIM stays :meth:`Diffusion.ddim_loop`, which
is what the paper runs and what the published numbers were measured with (bit-identical).

Network evaluations (NFE) per sample, for ``steps`` solver steps (:func:`nfe`):

* ``ddim``: ``steps`` (timesteps round(linspace(T-1, 0, steps)); the last one, at t = 0,
  only re-projects the clamped x0),
* ``dpmpp2m``: ``steps`` (one per interval of round(linspace(T-1, 0, steps+1))),
* ``heun``: ``2 * steps - 1`` (two per interval, the last interval Euler).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from patchddm_fast.diffusion.schedule import NetworkFn

SAMPLERS = ("ddim", "dpmpp2m", "heun")
DEFAULT_SAMPLER = "ddim"  # the paper's

# denoise(x_t, t) -> x0 estimate; x_t (N, 1, D, H, W), t (N,) long.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of one sample with ``steps`` solver steps."""
    check_sampler(sampler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_nfe(sampler: str, budget: int) -> int:
    """The most solver steps whose NFE is at most ``budget`` (Heun's NFE is odd: 2 -> 1 step)."""
    if budget < 1:
        raise ValueError(f"NFE budget must be >= 1, got {budget}")
    return (budget + 1) // 2 if check_sampler(sampler) == "heun" else budget


def solver_timesteps(timesteps: int, steps: int) -> List[int]:
    """``steps + 1`` distinct integer timesteps from T - 1 down to 0: the ODE solvers' grid."""
    if not 1 <= steps <= timesteps - 1:
        raise ValueError(f"steps must be in [1, {timesteps - 1}] for an ODE solver, got {steps}")
    return [int(v) for v in np.round(np.linspace(timesteps - 1, 0, steps + 1))]


def denoiser(diffusion, model_fn: NetworkFn) -> Denoiser:
    """x0 estimate of a network (output read as the diffusion's prediction type), clamped to
    [-1, 1] when the diffusion clamps x0 -- the same x0 DDIM steps with."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = diffusion.x0_from_output(x_t, t, model_fn(x_t, t).to(x_t.dtype))
        return x0.clamp(-1, 1) if diffusion.clip_x0 else x0

    return denoise


Schedule = Union[torch.Tensor, Sequence[float]]


def _host_schedule(alphas_cumprod: Schedule) -> List[float]:
    """alpha_bar as Python floats (float64): the solvers' coefficients are host scalars.  The
    sampler passes :attr:`Diffusion.alphas_cumprod_host`, so no tensor value is read while it
    runs (the memory simulator runs it on fake tensors)."""
    if isinstance(alphas_cumprod, torch.Tensor):
        return alphas_cumprod.double().tolist()
    return [float(v) for v in alphas_cumprod]


def _t(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def dpmpp2m_loop(denoise: Denoiser, alphas_cumprod: Schedule, x: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: data prediction, multistep, in
    lambda = log(alpha / sigma)); yields x after each of the ``steps`` evaluations.

    The first step is first order (it equals a DDIM step); later steps extrapolate the x0
    estimates linearly in lambda with ratio r = h_prev / h.  Coefficients in float64.
    """
    ts = solver_timesteps(len(alphas_cumprod), steps)
    a = _host_schedule(alphas_cumprod)
    alpha = [math.sqrt(a[t]) for t in ts]
    sigma = [math.sqrt(1.0 - a[t]) for t in ts]
    lam = [math.log(al / si) for al, si in zip(alpha, sigma)]
    prev_x0: Optional[torch.Tensor] = None
    h_prev = 0.0
    for i in range(steps):
        x0 = denoise(x, _t(x, ts[i]))
        h = lam[i + 1] - lam[i]
        if prev_x0 is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        prev_x0, h_prev = x0, h
        del x0, d  # prev_x0 is the one copy kept across the next evaluation
        yield x


def heun_loop(denoise: Denoiser, alphas_cumprod: Schedule, x: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
    """Deterministic Heun (Karras et al. 2022, Algorithm 1 with S_churn = 0) on
    sigma = sqrt((1 - a) / a) and the scaled state x / sqrt(a), whose ODE is
    dx/dsigma = (x - D(x)) / sigma; second order except the last interval (Euler).
    Yields x (in the diffusion's own scaling) after each interval."""
    ts = solver_timesteps(len(alphas_cumprod), steps)
    a = _host_schedule(alphas_cumprod)
    sq = [math.sqrt(a[t]) for t in ts]
    sig = [math.sqrt((1.0 - a[t]) / a[t]) for t in ts]
    y = x / sq[0]
    del x  # only y from here on (it has x's batch and device)
    for i in range(steps):
        d = (y - denoise(y * sq[i], _t(y, ts[i]))) / sig[i]
        y_next = y + (sig[i + 1] - sig[i]) * d
        if i + 1 < steps:
            d2 = (y_next - denoise(y_next * sq[i + 1], _t(y, ts[i + 1]))) / sig[i + 1]
            y_next = y + (sig[i + 1] - sig[i]) * 0.5 * (d + d2)
            del d2
        y = y_next
        del d, y_next  # only y is alive across the next interval's evaluations
        yield y * sq[i + 1]


def sample_loop(diffusion, sampler: str, model_fn: NetworkFn,
                noise: torch.Tensor, steps: int, *, eta: float = 0.0,
                generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Run ``sampler`` from ``noise`` with the network ``model_fn``; yields x after each
    solver step (the last is the sample).  ``eta``/``generator`` are DDIM's (stochastic DDIM);
    DPM-Solver++ and Heun are deterministic and refuse eta != 0."""
    check_sampler(sampler)
    # The loops hold the initial noise only until their first step replaces it (``del noise``),
    # and x0 estimates only as long as a step needs them: on the device, the sampler's state
    # across a network evaluation is x (DPM-Solver++ also keeps the previous x0).
    if sampler == "ddim":
        ddim = diffusion.ddim_loop(model_fn, tuple(noise.shape), steps, eta=eta, generator=generator,
                                   device=noise.device, dtype=noise.dtype, noise=noise)
        del noise
        for _, x, x0 in ddim:
            del x0
            yield x
        return
    if eta != 0:
        raise ValueError(f"eta = {eta} needs the ddim sampler; {sampler} is deterministic")
    loop = (dpmpp2m_loop if sampler == "dpmpp2m" else heun_loop)(denoiser(diffusion, model_fn),
                                                                diffusion.alphas_cumprod_host, noise, steps)
    del noise
    yield from loop
