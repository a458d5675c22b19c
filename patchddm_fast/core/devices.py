"""Turning a ``--device`` string into a torch device, or a clear sentence when it cannot be met.

Without this check ``--device cuda`` on a machine without CUDA surfaces deep inside
``torch.load`` or the first ``.to()``, and reads like a damaged checkpoint.
"""
from __future__ import annotations

import re

import torch

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda[:N]`` only when that GPU exists."""
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceUnavailableError(f"--device {name}: CUDA is not available on this machine ({why}); "
                                         f"use --device cpu or --device auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(f"--device {name}: this machine has {count} CUDA device(s) "
                                         f"(cuda:0 .. cuda:{count - 1})")
    return device
