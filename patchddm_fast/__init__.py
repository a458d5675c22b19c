"""patchddm_fast: memory-optimised 3D denoising diffusion models for medical image segmentation.

>>> from patchddm_fast import Trainer, TrainConfig, UNet3D

The package's face (the top layer): it may import every layer below, and nothing in the
package imports it.  ``Trainer`` here is :class:`patchddm_fast.training.trainer.Trainer` that
first asks the memory planner for a plan when ``config.memory_budget`` is set, and
``segment_volume`` is :func:`patchddm_fast.sampling.segment.segment_volume` that does the same
for a ``memory_budget=`` argument (as ``patchddm train`` / ``predict`` do); the layers below
run the plan they are given and never plan.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from patchddm_fast.training.config import TrainConfig
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.unet import UNet3D

__version__ = "0.1.0"
__all__ = ["Diffusion", "TrainConfig", "Trainer", "UNet3D", "segment_volume"]


@functools.lru_cache(maxsize=None)
def _planning_trainer() -> type:
    # Imported on first use: the trainer pulls in the data, metrics and planner modules.
    from patchddm_fast.analysis.planner import plan_training
    from patchddm_fast.training.config import as_config
    from patchddm_fast.training import distributed, trainer

    class Trainer(trainer.Trainer):
        """:class:`patchddm_fast.training.trainer.Trainer`; with ``config.memory_budget`` set and
        no ``plan`` given, the planner's plan for the budget (per rank under torchrun)."""

        def __init__(self, config: Any = None, *, plan: Any = None, **kwargs: Any):
            cases = {k: kwargs.pop(k) for k in ("train_cases", "val_cases") if k in kwargs}
            config = as_config(config, **kwargs)
            if plan is None and config.memory_budget:
                plan = plan_training(config, ddp=distributed.env_world_size() > 1)
            super().__init__(config, plan=plan, **cases)

    Trainer.__module__, Trainer.__qualname__ = __name__, "Trainer"
    return Trainer


def segment_volume(model: Any, diffusion: Any, image: Any, *, memory_budget: Any = None, **kwargs: Any) -> Any:
    """:func:`patchddm_fast.sampling.segment.segment_volume`; with ``memory_budget`` (e.g. "8GB")
    and no ``plan``, the planner's plan for this volume (ops, precision, offload, tiling and
    ensemble members per batch)."""
    # Imported on first use: sampling and the planner pull in the data and simulator modules.
    from patchddm_fast.analysis.planner import plan_sampling
    from patchddm_fast.sampling import segment

    if memory_budget is not None and kwargs.get("plan") is None:
        ensemble = kwargs.get("ensemble", inspect.signature(segment.segment_volume).parameters["ensemble"].default)
        kwargs["plan"] = plan_sampling(model, memory_budget, kwargs["method"], image.shape,
                                       ensemble if kwargs.get("member_batch") is None else 1)
    return segment.segment_volume(model, diffusion, image, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        return _planning_trainer()
    raise AttributeError(name)
