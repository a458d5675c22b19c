"""Checkpoints that survive crashes and never unpickle arbitrary objects.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(weights_only=True)`` (safe against the pickle
attacks that made PyTorch change the default).  The run configuration is stored as a
JSON string.  Writes go to a temporary file in the same folder, are fsync'ed, then
renamed over the target: an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write_fn) -> None:
    """Call ``write_fn(file_object)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: Path, state: Dict[str, Any], config: Dict[str, Any]) -> None:
    payload = dict(state, format_version=FORMAT_VERSION, config_json=json.dumps(config, sort_keys=True))
    atomic_write_bytes(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, map_location="cpu") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Returns (state, config).  Raises ValueError naming the file if it is not ours or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled objects...
        raise ValueError(f"checkpoint {path} cannot be read safely: {exc}") from exc
    if not isinstance(payload, dict) or "config_json" not in payload or "model" not in payload:
        raise ValueError(f"checkpoint {path} is not a patchddm_fast checkpoint (no model/config)")
    config = json.loads(payload.pop("config_json"))
    return payload, config


def build_model(config: Dict[str, Any]):
    """The network a run's config describes (same code path for training and inference)."""
    from patchddm_fast.conditioning import in_channels
    from patchddm_fast.nn.unet import UNet3D
    from patchddm_fast.regions import target_channels

    arch = dict(config["model"])
    mask_channels = target_channels(config.get("target", "binary"))
    arch["in_channels"] = in_channels(config["method"], config.get("image_channels", 4), mask_channels)
    arch["out_channels"] = mask_channels
    return UNet3D(**arch, ops=config.get("ops", "reference"), checkpoint=config.get("checkpoint", "none"))


def load_for_inference(path, device="cpu"):
    """(model in eval mode, Diffusion, config dict) from a checkpoint written by the Trainer."""
    from patchddm_fast.diffusion import Diffusion

    state, config = load_checkpoint(Path(path), map_location=device)
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    model.set_checkpoint("none")
    return model, Diffusion(**config["diffusion"]), config
