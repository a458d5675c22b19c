"""Evaluation: how good a segmentation is, and pictures of it.

Modules: :mod:`~patchddm_fast.eval.metrics` (Dice, HD95 in mm, MONAI/BraTS definition),
:mod:`~patchddm_fast.eval.lesionwise` (BraTS 2023 lesion-wise Dice/HD95),
:mod:`~patchddm_fast.eval.uncertainty` (variance vs errors: AUROC, reliability, ECE),
:mod:`~patchddm_fast.eval.scoring` (one case's scores and their summary, as metrics.json holds them),
:mod:`~patchddm_fast.eval.figures` (PNG montages and summaries, matplotlib's Agg canvas).

Layer 3: works on numpy arrays; may import core and data (label conventions, regions),
never the model, diffusion, training, sampling, analysis or the CLI -- those call it.
"""
