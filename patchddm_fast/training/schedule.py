"""The learning-rate schedule: a pure function of the step, driven by torch's LRScheduler.

:func:`learning_rate` is the one formula; :class:`StepSchedule` is the
``torch.optim.lr_scheduler`` object the train step advances (its state -- the step -- is
saved in every checkpoint).  Why not ``LambdaLR``: it computes ``base_lr * factor(step)``,
which rounds differently from ``learning_rate``'s formula (e.g. ``base * (k + 1) / warmup``
during warm-up), so the lr values -- and the trained weights -- would change in the last
bit.  Subclassing ``LRScheduler`` with ``get_lr`` returning the formula keeps them exact.

The base lr comes from the run's config, not from the optimizer's saved state: resuming
with a lower ``--lr`` (the divergence advice) applies the new lr from the resumed step on.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``.

    A pure function of the step, so a resumed run follows the same schedule exactly.
    ``cosine`` decays from ``base`` to 0 at the last step (after the warm-up).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return base
    progress = (step - warmup) / (total - warmup - 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StepSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's lr to ``learning_rate(base, step, ...)``; ``last_epoch`` is the
    0-based index of the next optimiser step (construction sets step 0's lr)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base: float, total: int, schedule: str = "constant",
                 warmup: int = 0):
        learning_rate(base, 0, total, schedule, warmup)  # a bad schedule name fails here
        self.base, self.total, self.schedule, self.warmup = base, total, schedule, warmup
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:
        lr = learning_rate(self.base, self.last_epoch, self.total, self.schedule, self.warmup)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        """Only the position: base lr, length and shape come from the (possibly changed) config."""
        return dict(last_epoch=self.last_epoch)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.seek(int(state_dict["last_epoch"]))

    def seek(self, step: int) -> None:
        """Continue at optimiser step ``step``: set its lr on every group."""
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
