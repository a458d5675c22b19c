"""Foundations every layer may use: checks of user values, safe output paths, atomic file
writes, device strings, run-folder locks and the data layer's error type.

Modules: :mod:`~patchddm_fast.core.validation` (ConfigError, flag/config checks),
:mod:`~patchddm_fast.core.safe_paths` (writes stay inside the output folder),
:mod:`~patchddm_fast.core.files` (atomic writes, stale temp files),
:mod:`~patchddm_fast.core.devices` (``--device`` -> torch.device),
:mod:`~patchddm_fast.core.runlock` (one process per run folder),
:mod:`~patchddm_fast.core.errors` (DatasetError).

Layer 0: may import the standard library, numpy and torch, and no other part of
patchddm_fast; everything else may import it.
"""
