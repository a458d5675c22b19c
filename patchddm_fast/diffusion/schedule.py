"""Gaussian diffusion for mask generation: schedule, forward noising, loss, DDIM.

One implementation of each formula (PAPER.md, "Reference training and sampling"):
linear beta schedule over T steps, ``q_sample``, epsilon-prediction MSE on the mask
channel only, and DDIM with eta = 0 by default (clamp x0, re-derive eps, last step to
alpha_bar_0).

Beyond the paper, the network's output can also be read as ``v`` (Salimans & Ho 2022:
v = sqrt(a) eps - sqrt(1 - a) x0) or ``x0`` directly (``prediction=``).  The paper's eps
needs x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), which amplifies the network's error by
sqrt((1 - a) / a) -- 156x at t = 999 -- so a briefly trained eps model is noise at high t;
v and x0 have no such amplification and train in a fraction of the steps.  Sampling is
the same DDIM update for all three: the output is turned into a (clamped) x0 and eps is
re-derived from it.  Schedules are held in float64 and gathered per step, so sampling in any
precision uses the exact coefficients.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# The network as a function: model_fn(x_t, t) -> its output, which is eps, v or x0 as
# Diffusion.prediction says (eps for the paper); x_t (N, 1 or 3, D, H, W), t (N,) long.
NetworkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("eps", "v", "x0")


class Diffusion:
    """Linear-beta DDPM schedule with DDIM sampling.

    Args:
        timesteps: T (1000 in the paper).
        beta_start, beta_end: the linear schedule's end points (1e-4, 0.02).
        clip_x0: clamp the predicted x0 to [-1, 1] during sampling (the paper does).
        prediction: what the network outputs -- "eps" (the paper), "v" or "x0".
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, clip_x0: bool = True,
                 prediction: str = "eps"):
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.timesteps = timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.clip_x0 = clip_x0
        self.betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # The same schedule as Python floats: the samplers' per-step coefficients are host
        # scalars, read here rather than from a tensor (no device read per step, and the
        # memory simulator runs the sampler on fake tensors, whose values cannot be read).
        self.alphas_cumprod_host = self.alphas_cumprod.tolist()

    def config(self) -> dict:
        return dict(timesteps=self.timesteps, beta_start=self.beta_start, beta_end=self.beta_end, clip_x0=self.clip_x0,
                    prediction=self.prediction)

    # ------------------------------------------------------------------ helpers
    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar[t] broadcast to ``like``'s shape (batch first), in like's dtype."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        return a.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
        return torch.randint(0, self.timesteps, (batch,), generator=generator, device=device)

    # ------------------------------------------------------------------ training
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_loss(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        cond: torch.Tensor,
        mask: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        build_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Plain MSE between the network's output and its target on the mask channel (in fp32):
        the noise for eps-prediction (the paper), v or x0 otherwise (:meth:`target`).
        ``cond``: the conditioning channels; ``build_input(cond, x_t)`` is the network input."""
        x_t = self.q_sample(mask, t, noise)
        out = model(build_input(cond, x_t), t)
        return F.mse_loss(out.float(), self.target(mask, t, noise).float())

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = self.alpha_bar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def x0_from_output(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The x0 a network output implies (inverse of :meth:`target` given x_t)."""
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, out)
        if self.prediction == "x0":
            return out
        a = self.alpha_bar(t, x_t)
        return a.sqrt() * x_t - (1 - a).sqrt() * out

    # ------------------------------------------------------------------ sampling
    def ddim_timesteps(self, steps: int) -> list[int]:
        """round(linspace(T-1, 0, steps)) as Python ints (PAPER.md)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        return [int(v) for v in np.round(np.linspace(self.timesteps - 1, 0, steps))]

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def ddim_step(
        self,
        x_t: torch.Tensor,
        t: int,
        t_prev: int,
        out: torch.Tensor,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update from step t to t_prev; returns (x_prev, x0_pred).

        ``out`` is the network's output (eps for the paper's parameterisation).  x0 is
        predicted, clamped to [-1, 1], and eps re-derived from the clamped x0 so the update
        stays on the deterministic trajectory (eta = 0) or adds sigma_t noise (eta > 0).
        """
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0 = self.x0_from_output(x_t, tt, out)
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        eps = out if (self.prediction == "eps" and not self.clip_x0) else self.eps_from_x0(x_t, tt, x0)
        a_t = self.alphas_cumprod_host[t]
        a_prev = self.alphas_cumprod_host[t_prev]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(max(0.0, 1 - a_t / a_prev))
        x_prev = np.sqrt(a_prev) * x0 + np.sqrt(max(0.0, 1 - a_prev - sigma**2)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return x_prev, x0

    def ddim_loop(
        self,
        model_fn: NetworkFn,
        shape: Tuple[int, ...],
        steps: int,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        device="cpu",
        dtype=torch.float32,
        noise: Optional[torch.Tensor] = None,
    ) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Yields (t, x_prev, x0_pred) after each of the ``steps`` network evaluations.

        Starts from N(0, I) (or ``noise``); step i goes from t_i to t_{i+1}; the last step
        (at t = 0) uses alpha_bar_prev = alpha_bar_0.
        """
        ts = self.ddim_timesteps(steps)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device, dtype=dtype)
        del noise  # held as x only, so the first step frees it (when the caller holds none)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else 0
            out = model_fn(x, torch.full((shape[0],), t, dtype=torch.long, device=x.device))
            x, x0 = self.ddim_step(x, t, t_prev, out.to(x.dtype), eta=eta, generator=generator)
            del out
            yield t, x, x0
            del x0  # not alive on the device during the next network evaluation
