"""Layer 1, the public face of the fused ops: ``patchddm_fast.ops.<op>`` is the stable name.

The ops live in :mod:`patchddm_fast.kernels` (schemas, Triton/C++/composite kernels, fake
kernels, autograd); their internal layout may change, these names do not (issue 9,
"Interfaces").  May import: :mod:`patchddm_fast.kernels` (same layer) and below.
"""
from patchddm_fast.kernels.average_skip import average_skip_, residual_add_
from patchddm_fast.kernels.gn_silu import group_norm_silu
from patchddm_fast.kernels.fused_conv3d import gn_silu_conv3d

__all__ = ["group_norm_silu", "average_skip_", "residual_add_", "gn_silu_conv3d"]
