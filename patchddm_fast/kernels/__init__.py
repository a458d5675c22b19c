"""Fused ops of the memory-optimised U-Net, as ``torch.library`` custom ops (namespace ``patchddm``).

Public entry points:

* :func:`group_norm_silu` -- ``SiLU(GroupNorm(x + bias_in))`` saving only x and
  per-group statistics for backward (``patchddm::gn_silu_fwd`` / ``gn_silu_bwd``);
* :func:`average_skip_` -- in-place ``h <- (h + skip) / 2`` (``patchddm::average_skip_``);
* :func:`residual_add_` -- in-place ``h <- h + skip`` (``patchddm::residual_add_``).

CUDA tensors run Triton kernels; CPU tensors run the C++ extension, the PyTorch
composite or -- for testing the real kernel code without a GPU -- the same Triton
kernels through Triton's interpreter: ``set_cpu_backend("triton-interpret")`` or
``PATCHDDM_TRITON_INTERPRET=1`` (see :mod:`.dispatch`; no ``TRITON_INTERPRET`` needed).
Every op has a fake implementation allocating exactly what the real one allocates, so
the ops run on the meta device / under FakeTensorMode and ``torch.compile``.
"""
from .average_skip import average_skip_, residual_add_
from .dispatch import CPU_BACKENDS, cpu_backend, get_cpu_backend, resolve_cpu_backend, set_cpu_backend
from .gn_silu import group_norm_silu

__all__ = [
    "group_norm_silu",
    "average_skip_",
    "residual_add_",
    "CPU_BACKENDS",
    "set_cpu_backend",
    "get_cpu_backend",
    "resolve_cpu_backend",
    "cpu_backend",
]
