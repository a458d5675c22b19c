"""Sampling (layer 4): whole-volume segmentation with an ensemble (``segment_volume``).

Owns :mod:`.segment`: padding and HalfRes decimation, ensembles (one member at a time or
several as one network batch), the run of a received
:class:`~patchddm_fast.model.execution.policy.ExecutionPlan` (it never plans).  May import
core, kernels, data, model and diffusion; never training, analysis or the CLI.
"""
