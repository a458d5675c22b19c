"""Layer 1, kernels: the fused ops as ``torch.library`` custom ops (namespace ``patchddm``).

Owns: the ops' schemas and every implementation of them -- Triton kernels (CUDA, and
through Triton's interpreter on CPU), the C++ CPU kernels of csrc/ (:mod:`.cpu_ext`), the
plain-PyTorch composite (:mod:`.composite`) -- plus their fake kernels, autograd, the
CPU implementation switch (:mod:`.backends`), the ahead-of-time compile check
(:mod:`.aot`) and the oneDNN 3D convolution for the CPU (:mod:`.conv3d_cpu`).  It knows no
``nn.Module``: the model (layer 2) calls these functions.

May import: torch, triton and :mod:`patchddm_fast.core`; nothing else of the project.

Public entry points:

* :func:`group_norm_silu` -- ``SiLU(GroupNorm(x + bias_in))`` saving only x and
  per-group statistics for backward (``patchddm::gn_silu_fwd`` / ``gn_silu_bwd``);
* :func:`average_skip_` -- in-place ``h <- (h + skip) / 2`` (``patchddm::average_skip_``);
* :func:`residual_add_` -- in-place ``h <- h + skip`` (``patchddm::residual_add_``);
* :func:`gn_silu_conv3d` -- ``conv3d(up(SiLU(GroupNorm(x + bias_in)))) (+ residual)`` as one
  Triton implicit-GEMM convolution with the norm/upsampling as prologues
  (``patchddm::gn_silu_conv3d_fwd`` / ``_bwd``, :mod:`.fused_conv3d`).

:mod:`patchddm_fast.ops` re-exports these under their stable public names.

Each op has one schema and one kernel per device: CUDA runs Triton; CPU runs the C++
kernels (registered for the schema's CPU key), the composite, or -- for testing the real
kernel code without a GPU -- the Triton kernels through the interpreter:
``set_cpu_backend("triton-interpret")`` or ``PATCHDDM_TRITON_INTERPRET=1`` (see
:mod:`.backends`; no ``TRITON_INTERPRET`` needed).  Every op has a fake implementation
allocating exactly what the real one allocates, so the ops run on the meta device /
under FakeTensorMode and ``torch.compile``, and the memory simulator counts them.
"""
from .average_skip import average_skip_, residual_add_
from .backends import CPU_BACKENDS, cpu_backend, get_cpu_backend, resolve_cpu_backend, set_cpu_backend
from .gn_silu import group_norm_silu
from .fused_conv3d import gn_silu_conv3d

__all__ = [
    "group_norm_silu",
    "average_skip_",
    "residual_add_",
    "gn_silu_conv3d",
    "CPU_BACKENDS",
    "set_cpu_backend",
    "get_cpu_backend",
    "resolve_cpu_backend",
    "cpu_backend",
]
