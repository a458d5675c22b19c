"""The two workloads every memory number is about, written once.

* :func:`train_step` -- the Trainer's step: forward and loss under the precision's autocast,
  ``zero_grad(set_to_none=True)`` (after the forward, as the Trainer does), backward through
  the loss scaler, optimizer step;
* :func:`network_eval` -- one evaluation as the DDIM sampler runs it:
  ``model(network_input(cond, x_t), t).float()`` under no_grad and autocast.

The simulator runs them on fake tensors, ``patchddm profile`` and the benchmarks on real
ones, so prediction and measurement describe the same code.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Optional

import torch

from patchddm_fast.model.conditioning import network_input

Phase = Callable[[str], ContextManager]


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def train_inputs(in_channels: int, size: int, batch: int = 1, device="cpu",
                 generator: Optional[torch.Generator] = None, mask_channels: int = 1) -> Dict[str, torch.Tensor]:
    """Random conditioning (N, C - M, S, S, S), binary mask x0 of M channels (1, or 3 for the
    WT/TC/ET regions), noise and timesteps, all fp32 like the Trainer's."""
    shape = (batch, mask_channels, size, size, size)
    kw = dict(generator=generator, device=device)
    return dict(
        cond=torch.randn((batch, in_channels - mask_channels, size, size, size), **kw),
        x0=(torch.rand(shape, **kw) > 0.5).float(),
        noise=torch.randn(shape, **kw),
        t=torch.randint(0, 1000, (batch,), **kw),
    )


def train_step(model: torch.nn.Module, diffusion, optimizer: torch.optim.Optimizer, precision, inputs: Dict[str, torch.Tensor],
               scaler=None, autocast_device: Optional[str] = None, phase: Phase = _no_phase) -> torch.Tensor:
    """One Trainer step; returns the (detached) loss."""
    scaler = scaler if scaler is not None else precision.scaler
    with phase("forward"), precision.autocast(autocast_device):
        loss = diffusion.training_loss(model, inputs["cond"], inputs["x0"], inputs["t"], inputs["noise"], network_input)
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with phase("optimizer"):
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def eval_inputs(in_channels: int, size: int, batch: int = 1, device="cpu", cond_dtype: torch.dtype = torch.float32,
                generator: Optional[torch.Generator] = None, mask_channels: int = 1) -> Dict[str, torch.Tensor]:
    """The sampler's state for one evaluation: conditioning (held in ``cond_dtype``), x_t (fp32,
    M mask channels), t."""
    kw = dict(generator=generator, device=device)
    return dict(
        cond=torch.randn((batch, in_channels - mask_channels, size, size, size), **kw).to(cond_dtype),
        x_t=torch.randn((batch, mask_channels, size, size, size), **kw),
        t=torch.randint(0, 1000, (batch,), **kw),
    )


def network_eval(model: torch.nn.Module, precision, inputs: Dict[str, torch.Tensor], autocast_device: Optional[str] = None,
                 phase: Phase = _no_phase) -> torch.Tensor:
    """One no-grad evaluation; the network input is built in the conditioning's dtype."""
    cond = inputs["cond"]
    with torch.no_grad(), phase("forward"), precision.autocast(autocast_device):
        return model(network_input(cond, inputs["x_t"].to(cond.dtype)), inputs["t"]).float()
