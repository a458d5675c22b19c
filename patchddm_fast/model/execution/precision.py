"""Mixed-precision policy: one object that says how a device computes.

``resolve_precision("auto", device)`` picks what the hardware does best and is safe:

* CUDA with bf16 support (Ampere and newer): **bf16** autocast.  bf16 has fp32's exponent
  range, so no loss scaling is needed;
* other CUDA devices: **fp16** autocast with dynamic loss scaling (``torch.amp.GradScaler``),
  the paper's own recipe;
* CPU (and anything else): **fp32** -- CPU autocast is slower than fp32 for 3D convolutions
  and the numbers must match the reference.

Only matmul-like ops (convolutions, linear layers) run in the low precision; statistics and
the loss stay fp32 (the network's GroupNorm computes in fp32 either way, and the loss is an
fp32 MSE).  fp32 is a real no-op policy: ``autocast()`` is a null context and the scaler's
methods are plain pass-throughs, so the training loop has one code path for every precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Dict, Optional, Union

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NoScaler:
    """GradScaler's interface without scaling: what fp32 and bf16 training use.

    ``scale(loss)`` returns the loss unchanged, ``step(opt)`` calls ``opt.step()``;
    ``state_dict()`` is empty so checkpoints written with it load anywhere.
    """

    def scale(self, outputs: Any) -> Any:
        return outputs

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: Optional[float] = None) -> None:
        return None

    def get_scale(self) -> float:
        return 1.0

    def is_enabled(self) -> bool:
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # A checkpoint written under fp16 carries a GradScaler state; it is meaningless here.
        return None


@dataclass
class Precision:
    """The resolved policy.  ``name`` is one of fp32/fp16/bf16 (never "auto")."""

    name: str
    device: torch.device
    scaler: Any = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype matmul-like ops run in (fp32 for the fp32 policy)."""
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self, device_type: Optional[str] = None) -> ContextManager:
        """Autocast context for this policy; a null context for fp32.

        ``device_type`` overrides the device's type: the memory simulator runs the real
        step on CPU fake tensors under ``autocast("cpu")`` with the same dtype (CPU and
        CUDA autocast treat every op of this network alike).
        """
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type or self.device.type, dtype=self.dtype)


def bf16_supported(device: torch.device) -> bool:
    """True for CUDA devices that compute bf16 natively (compute capability >= 8.0)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_precision(name: str = "auto", device: Union[torch.device, str] = "cpu") -> Precision:
    """The precision policy for ``name`` on ``device`` (see the module docstring for "auto").

    An explicit fp16/bf16 on a CPU is honoured (CPU autocast; fp16 with a CPU GradScaler),
    though it is rarely faster there.  Raises ValueError for unknown names and for bf16 on a
    CUDA device without native bf16.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    if name == "auto":
        name = ("bf16" if bf16_supported(device) else "fp16") if is_cuda else "fp32"
    elif name == "bf16" and is_cuda and not bf16_supported(device):
        raise ValueError(f"precision 'bf16' is not supported on {device} (needs compute capability >= 8.0); use fp16 or auto")
    if name == "fp16":
        scaler: Any = torch.amp.GradScaler(device.type)
    else:
        scaler = NoScaler()
    return Precision(name=name, device=device, scaler=scaler)
