"""The network: the PatchDDM 3D U-Net and how it executes.

Owns :mod:`.unet` (the U-Net, its blocks and its stage list), :mod:`.backend` (the primitive
ops behind the reference/fused switch), :mod:`.conditioning` (what the network is fed per
method) and :mod:`.execution` (execution policy, precision, recompute, offload, tiled
inference).  The model is told how to run by an ``ExecutionPolicy``; it never decides
this itself.

May import: :mod:`patchddm_fast.kernels`, :mod:`patchddm_fast.data` and
:mod:`patchddm_fast.core` -- nothing above (no diffusion, training, analysis or CLI).
"""
from patchddm_fast.model.execution.policy import ExecutionPolicy
from patchddm_fast.model.unet import RECOMPUTE_MODES, UNet3D, count_parameters, timestep_embedding

__all__ = ["ExecutionPolicy", "RECOMPUTE_MODES", "UNet3D", "count_parameters", "timestep_embedding"]
