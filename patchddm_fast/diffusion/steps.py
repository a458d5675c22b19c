"""The one training step and the one network evaluation: the only copies.

* :func:`train_step` -- forward and loss under the precision's autocast, an optional check
  of the loss (the Trainer's divergence test), ``zero_grad(set_to_none=True)`` (after the
  forward), backward through the loss scaler, optional gradient-norm clipping (on unscaled
  gradients), optimizer step, the lr schedule's advance, and the weights' moving average;
* :func:`network_eval` -- one evaluation as the samplers run it:
  ``model(network_input(cond, x_t), t).float()`` under no_grad and the given autocast.

The Trainer and the whole-volume sampler call them on real data, the simulator on fake
tensors, ``patchddm profile`` and the benchmarks on random real ones, so training,
prediction and measurement describe the same code (``tests/test_trainer.py`` checks that
the simulator's step is this function object).
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


def train_step(model: torch.nn.Module, diffusion, optimizer: torch.optim.Optimizer, precision,
               inputs: Dict[str, torch.Tensor], scaler=None, autocast_device: Optional[str] = None,
               phase: Phase = _no_phase, grad_clip: Optional[float] = None,
               schedule: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
               check_loss: Optional[Callable[[torch.Tensor], None]] = None,
               ema: Optional[torch.optim.swa_utils.AveragedModel] = None) -> torch.Tensor:
    """One training step; returns the (detached) loss.

    ``grad_clip``: clip the gradient norm of ``optimizer``'s parameters to this value (the
    scaler unscales first).  ``schedule``: the lr scheduler, advanced after the optimizer
    step (it set this step's lr when it was created or last advanced).  ``check_loss``:
    called with the detached loss before backward (may raise to stop the step).  ``ema``: a
    ``torch.optim.swa_utils.AveragedModel`` updated with the new weights after the step.
    """
    scaler = scaler if scaler is not None else precision.scaler
    with phase("forward"), precision.autocast(autocast_device):
        loss = diffusion.training_loss(model, inputs["cond"], inputs["x0"], inputs["t"], inputs["noise"], network_input)
    if check_loss is not None:
        check_loss(loss.detach())
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with phase("optimizer"):
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if schedule is not None:
            schedule.step()
        if ema is not None:
            ema.update_parameters(model)
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


def network_eval(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], autocast: Optional[ContextManager] = None,
                 phase: Phase = _no_phase) -> torch.Tensor:
    """One no-grad evaluation in fp32 out; the network input is built in the conditioning's
    dtype.  ``autocast``: a (reusable) context such as ``Precision.autocast()``; fp32 if None.
    A conditioning of batch 1 is broadcast to x_t's batch (ensemble members as one batch)."""
    cond, x_t = inputs["cond"], inputs["x_t"]
    if cond.shape[0] == 1 and x_t.shape[0] != 1:
        cond = cond.expand(x_t.shape[0], *cond.shape[1:])
    with torch.no_grad(), phase("forward"), (autocast if autocast is not None else contextlib.nullcontext()):
        return model(network_input(cond, x_t.to(cond.dtype)), inputs["t"]).float()
