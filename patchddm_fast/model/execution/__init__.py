"""How the network executes, separate from what it computes.

Owns :mod:`.policy` (``ExecutionPolicy`` / ``ExecutionPlan``: the choices, as values),
:mod:`.precision` (mixed-precision policy), :mod:`.recompute` (selective / block activation
recompute), :mod:`.skips` (where encoder skips wait: ``SkipStack``, ``OffloadedSkips``),
:mod:`.offload` (host-memory transfer stores, saved-tensor offload, the offload handler)
and :mod:`.tiled` (slab-wise low-memory inference, walking ``UNet3D.stages``).

Imports run one way: policy, skips <- offload; recompute <- tiled; all of them <- unet.
May import: :mod:`patchddm_fast.kernels`, :mod:`patchddm_fast.model.backend`,
:mod:`patchddm_fast.data` and :mod:`patchddm_fast.core`; never :mod:`patchddm_fast.model.unet`
(the network imports its execution, not the other way round) nor anything above the model.
"""
