"""Checkpoints that survive crashes, never unpickle arbitrary objects, and prove their integrity.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(weights_only=True)`` (safe against the pickle
attacks that made PyTorch change the default).  The run configuration is stored as a
JSON string.  Writes go to a temporary file in the same folder, are fsync'ed, then
renamed over the target (:mod:`patchddm_fast.core.files`): an interrupted save leaves the
previous checkpoint intact, and the temporary files a killed process leaves behind are
removed at the next start (:func:`~patchddm_fast.core.files.remove_stale_temp_files`).

Integrity (format 2): the file stores ``sha256``, a digest of every tensor's bytes, dtype
and shape and every other value, walked in a fixed order (:func:`state_digest`); loading
recomputes and compares it, so flipped bits or a truncated tensor are an error naming the
file instead of a silently wrong network.  Non-finite weights are refused on save and on
load, and the stored config is checked against the weights' shapes.  Format-1 files
(no digest) still load, with the finite and shape checks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from patchddm_fast.core.files import atomic_write_bytes
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.model.execution.policy import ExecutionPolicy
from patchddm_fast.model.method import IMAGE_CHANNELS, get_method
from patchddm_fast.model.unet import UNet3D

FORMAT_VERSION = 2  # 2: with the sha256 digest; 1: without (still readable)
REQUIRED_CONFIG_KEYS = ("method", "model", "diffusion")
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for item in obj:
            _feed(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"S{type(obj).__name__}{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint values must be tensors or plain data, got {type(obj).__name__}")


def state_digest(payload: Dict[str, Any]) -> str:
    """SHA-256 over every value of ``payload`` except its ``sha256`` entry (device-independent)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def non_finite_weights(weights: Dict[str, Any]) -> List[str]:
    """Names of floating-point tensors in ``weights`` holding NaN or Inf."""
    return [k for k, t in weights.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


class NonFiniteWeightsError(ValueError):
    """Weights hold NaN/Inf: refused on save (a diverged run) and on load (a damaged file)."""


def save_checkpoint(path: Path, state: Dict[str, Any], config: Dict[str, Any]) -> None:
    """Write ``state`` + ``config`` atomically with a digest; refuses non-finite model weights."""
    bad = non_finite_weights(state.get("model", {}))
    if bad:
        raise NonFiniteWeightsError(f"{path}: not saved: {len(bad)} weight tensor(s) hold NaN/Inf (e.g. {bad[0]})")
    payload = dict(state, format_version=FORMAT_VERSION, config_json=json.dumps(config, sort_keys=True))
    payload["sha256"] = state_digest(payload)
    # Serialised in memory first: torch's zip writer reports a failed write (disk full,
    # file-size limit) as an opaque "unexpected pos" error, f.write as a proper OSError.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), lambda f: f.write(buffer.getbuffer()))


def _read_payload(path: Path, map_location) -> Dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): a failed copy or an interrupted download?")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC and not head.startswith(PICKLE_MAGIC):
        kind = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a PyTorch file"
        raise ValueError(f"checkpoint {path} is not a checkpoint written by `patchddm train` ({kind}, "
                         f"{size} bytes, starts with {head!r})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, pickled objects...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} cannot be read safely (truncated or damaged, or holds objects "
                         f"other than tensors and plain data): {reason}") from exc


def load_checkpoint(path: Path, map_location="cpu") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Returns (state, config).  Raises ValueError naming the file if it is not ours, is damaged
    (digest mismatch), holds non-finite weights, or stores an incomplete config."""
    path = Path(path)
    payload = _read_payload(path, map_location)
    if not isinstance(payload, dict) or "config_json" not in payload or "model" not in payload:
        raise ValueError(f"checkpoint {path} is not a patchddm_fast checkpoint (no model/config)")
    stored = payload.get("sha256")
    if stored is not None and stored != state_digest(payload):
        raise ValueError(f"checkpoint {path} is damaged: its contents do not match the sha256 digest stored "
                         f"when it was written (bit flips or a partial copy); use another copy")
    payload.pop("sha256", None)
    try:
        config = json.loads(payload.pop("config_json"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}: stored config is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint {path}: stored config is not a mapping")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"checkpoint {path}: stored config lacks {', '.join(map(repr, missing))} "
                         f"(it has {sorted(config)}); it was not written by `patchddm train`")
    if not isinstance(payload["model"], dict):
        raise ValueError(f"checkpoint {path}: 'model' is not a state dict")
    bad = non_finite_weights(payload["model"])
    if bad:
        raise NonFiniteWeightsError(f"checkpoint {path} holds non-finite weights (NaN/Inf in {len(bad)} tensor(s), "
                                    f"e.g. {bad[0]}): the run diverged or the file is damaged")
    return payload, config


def check_weights_match(model: torch.nn.Module, weights: Dict[str, Any], path: Path, config: Dict[str, Any]) -> None:
    """One-line error naming ``path`` when the weights do not fit the network its config describes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [(k, tuple(weights[k].shape), tuple(expected[k].shape)) for k in expected
             if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    example = (f"e.g. {wrong[0][0]} is {wrong[0][1]} in the file but {wrong[0][2]} for the config" if wrong else
               f"e.g. {(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}")
    raise ValueError(f"checkpoint {path}: stored config (method {config.get('method')!r}, model "
                     f"{json.dumps(config.get('model'), sort_keys=True)}) does not match its weights: "
                     f"{len(wrong)} shape mismatch(es), {len(missing)} missing and {len(unexpected)} unexpected "
                     f"tensor(s); {example}")


def build_model(config: Dict[str, Any]):
    """The network a run's config describes (same code path for training and inference)."""
    arch = dict(config["model"])
    arch.update(get_method(config["method"]).network_channels(config.get("target", "binary"),
                                                              config.get("image_channels", IMAGE_CHANNELS)))
    # The config keeps the flag name "checkpoint"; the network calls it "recompute".
    policy = ExecutionPolicy(ops=config.get("ops", "reference"), recompute=config.get("checkpoint", "none"))
    return UNet3D(**arch, policy=policy)


def data_multiple(config: Dict[str, Any]) -> int:
    """Every volume a run trains or predicts on must have edges that are multiples of this:
    the network's ``UNet3D.size_multiple`` (built on the meta device: no weights) times the
    method's decimation (HalfRes decimates by 2 before the network)."""
    with torch.device("meta"):
        multiple = build_model(config).size_multiple
    return get_method(config["method"]).size_multiple(multiple)


def _inference_weights(state: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """The weights to sample with: the moving average (``AveragedModel``'s ``module.*`` keys)
    when the run kept one (``ema_decay``), else the trained weights."""
    if "ema" not in state:
        return state["model"]
    prefix = "module."
    weights = {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    if set(weights) != set(state["model"]):
        raise ValueError(f"checkpoint {path}: the weight average does not cover the network's parameters")
    return weights


def load_for_inference(path, device="cpu"):
    """(model in eval mode, Diffusion, config dict) from a checkpoint written by the Trainer."""
    state, config = load_checkpoint(Path(path), map_location=device)
    try:
        model = build_model(config)
        diffusion = Diffusion(**config["diffusion"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint {path}: stored config does not describe a network ({exc})") from exc
    weights = _inference_weights(state, Path(path))
    check_weights_match(model, weights, Path(path), config)
    model.load_state_dict(weights)
    model.to(device).eval()
    model.apply_policy(dataclasses.replace(model.policy, recompute="none"))
    return model, diffusion, config
