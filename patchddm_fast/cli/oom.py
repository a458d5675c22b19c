"""Out-of-memory errors answered with the memory planner's suggestion (train, sample, predict, demo).

The trainer and the sampler never call the planner; a CUDA out-of-memory error passes
through them (the sampler's as :class:`~patchddm_fast.sampling.segment.SamplingOutOfMemoryError`,
naming the grid it sampled) and the command turns it into advice here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from patchddm_fast.analysis.planner import oom_advice
from patchddm_fast.sampling.segment import SamplingOutOfMemoryError


@contextlib.contextmanager
def planner_advice_on_oom(method: str, mode: str) -> Iterator[None]:
    """Raise a CUDA out-of-memory error inside the block as a RuntimeError holding the
    planner's advice: for the sampled grid when sampling ran out, else for ``mode``."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        if isinstance(exc, SamplingOutOfMemoryError):
            raise RuntimeError(oom_advice(exc, preset=exc.method, mode="sample", size=exc.size)) from exc
        raise RuntimeError(oom_advice(exc, preset=method, mode=mode)) from exc
