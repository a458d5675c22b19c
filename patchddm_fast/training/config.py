"""The run configuration: one dataclass, serialisable to JSON/YAML, shared by API and CLI.

Defaults are the paper's (PAPER.md) wherever the paper says something; the CLI exposes
every field as a flag generated from this dataclass, so there is one source of truth for
names, defaults and help texts.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import yaml

from patchddm_fast.core import validation as v
from patchddm_fast.core.devices import DEVICE_PATTERN
from patchddm_fast.core.units import parse_bytes
from patchddm_fast.data.layouts import LAYOUTS
from patchddm_fast.data.patches import OFFSET_DISTRIBUTIONS
from patchddm_fast.data.preprocess import PreprocessConfig
from patchddm_fast.data.regions import CONVENTIONS, TARGETS
from patchddm_fast.diffusion.schedule import PREDICTIONS
from patchddm_fast.model.backend import OPS_BACKENDS
from patchddm_fast.model.method import METHODS
from patchddm_fast.model.execution.offload import OFFLOAD_MODES
from patchddm_fast.model.execution.precision import PRECISIONS
from patchddm_fast.model.unet import RECOMPUTE_MODES
from patchddm_fast.training.schedule import LR_SCHEDULES

PAPER_ARCH: Dict[str, Any] = dict(
    base_width=29, channel_mult=(1, 3, 4, 4, 4, 4, 4), enc_blocks=2, dec_blocks=3, mid_blocks=2, groups=29,
    skip="average",
)
PAPER_DIFFUSION: Dict[str, Any] = dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_x0=True)


RUN_RECORD_KEYS = ("world_size",)  # written to a run's config.json next to the settings


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    method: str = _help("patchddm (coordinate-encoded patches), halfres (stride-2 decimated volume), fullres (whole volume) or patches (patches without coordinates, an ablation)", default="patchddm")
    target: str = _help("what is diffused: binary (whole tumour, the paper's) or regions (WT/TC/ET as three overlapping channels, nnU-Net's BraTS regions)", default="binary")
    label_convention: Optional[str] = _help("label convention of the training data (binary, brats2020 or brats2023); detected from the data by the trainer and stored in checkpoints, so predict writes labels in the input's convention", default=None)
    model: Dict[str, Any] = _help("network architecture (UNet3D arguments; the paper's by default)", default_factory=lambda: dict(PAPER_ARCH))
    diffusion: Dict[str, Any] = _help("diffusion schedule (T, linear beta range), x0 clamping and what the network predicts: prediction eps (paper), v or x0", default_factory=lambda: dict(PAPER_DIFFUSION))
    data: str = _help("'phantom' for built-in synthetic BraTS-like cases, or a dataset folder (BraTS / nnU-Net / preprocessed)", default="phantom")
    layout: str = _help("dataset layout: auto, brats2020, brats2023, nnunet or patchddm-preprocessed", default="auto")
    split: Optional[str] = _help("split: a JSON file, a named split (brats2020-reference) or unset for a seeded random split", default=None)
    val_fraction: float = _help("validation fraction of a seeded random split", default=0.1)
    test_fraction: float = _help("test fraction of a seeded random split (never used for training)", default=0.1)
    preprocess: Dict[str, Any] = _help("preprocessing (percentile clipping, target grid; see patchddm_fast.data.preprocess.PreprocessConfig); stored in checkpoints so predict repeats it", default_factory=dict)
    cache_dir: Optional[str] = _help("where preprocessed volumes are cached (default $PATCHDDM_CACHE or ~/.cache/patchddm_fast/volumes)", default=None)
    preprocess_workers: int = _help("processes used to build the preprocessing cache", default=1)
    phantom_size: int = _help("edge length of phantom volumes", default=64)
    phantom_train: int = _help("number of phantom training cases", default=16)
    phantom_val: int = _help("number of phantom validation cases", default=2)
    phantom_options: Dict[str, Any] = _help("keyword arguments of data.phantom.make_phantom_dataset for phantom cases, e.g. {\"core\": [0.45, 0.85], \"necrosis\": [0.35, 0.85]} (tumour core and necrosis radius ranges) or {\"multifocal\": 0.5} (fraction of cases with 2-3 separate lesions)", default_factory=dict)
    patch_size: int = _help("PatchDDM training patch edge (voxels); the paper uses 128 on 256^3", default=128)
    patch_distribution: str = _help("patch offset distribution per axis: trapezoid (paper) or uniform", default="trapezoid")
    steps: int = _help("optimiser steps to train", default=1000)
    batch_size: int = _help("patches/volumes per step", default=1)
    lr: float = _help("AdamW learning rate (paper: 1e-5)", default=1e-5)
    weight_decay: float = _help("AdamW weight decay (paper: 0)", default=0.0)
    betas: Tuple[float, float] = _help("AdamW betas", default=(0.9, 0.999))
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    lr_schedule: str = _help("learning-rate schedule: constant (paper) or cosine (decay to 0 at the last step)", default="constant")
    warmup_steps: int = _help("linear learning-rate warm-up over the first N steps (0: none)", default=0)
    grad_clip: Optional[float] = _help("clip the gradient norm to this value (off when unset)", default=None)
    ema_decay: Optional[float] = _help("keep an exponential moving average of the weights with this decay (e.g. 0.995; the reference code's default is 0.9999) and sample with it; off when unset", default=None)
    precision: str = _help("auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16", default="auto")
    ops: str = _help("reference (plain PyTorch, the paper's) or fused (custom Triton/C++ ops)", default="reference")
    checkpoint: str = _help("activation checkpointing: none, selective (recompute GroupNorm-SiLU), block (recompute half of each residual block) or level (also recompute encoder levels)", default="none")
    offload: str = _help("keep encoder skips (skips) or also saved activations (all) in pinned host memory while they wait: none, skips or all", default="none")
    memory_budget: Optional[str] = _help("GPU memory budget such as 8GB: the planner picks checkpointing/offload/precision/patch size to fit", default=None)
    seed: int = _help("seed of every random choice (data, noise, timesteps, initial weights)", default=0)
    val_every: int = _help("validate (Dice on whole validation volumes) every N steps; 0 = only at the end", default=0)
    val_steps: int = _help("DDIM steps used for validation sampling", default=10)
    val_ensemble: int = _help("ensemble size used for validation", default=1)
    ckpt_every: int = _help("write out_dir/last.pt every N steps (atomically)", default=100)
    log_every: int = _help("append the mean loss to out_dir/log.jsonl every N steps", default=10)
    out_dir: str = _help("run folder for checkpoints, logs and validation results", default="runs/patchddm")
    resume: bool = _help("resume from out_dir/last.pt when it exists", default=True)
    device: str = _help("auto, cpu or cuda[:N]", default="auto")
    progress: bool = _help("show progress bars", default=True)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: Union[str, Mapping[str, str], None] = None) -> "TrainConfig":
        """A validated config (see :func:`validate_config`); ``source`` names where the values
        came from in error messages: one string, or a {key: source} mapping (file vs. flag)."""
        if not isinstance(d, Mapping):
            raise v.ConfigError(f"{_source_of(source, '')}: settings must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        # config.json of a run folder also records how it ran (not a setting): accept it back.
        d = {k: v for k, v in d.items() if k not in RUN_RECORD_KEYS}
        unknown = sorted(set(d) - names)
        if unknown:
            where = _source_of(source, unknown[0])
            raise v.ConfigError(f"{where + ': ' if where else ''}unknown config keys {unknown} "
                                f"(e.g. {unknown[0]!r} = {d[unknown[0]]!r}); valid keys: {sorted(names)}")
        d = dict(d)
        for key, default in (("model", PAPER_ARCH), ("diffusion", PAPER_DIFFUSION)):
            if key in d:
                if not isinstance(d[key], Mapping):
                    raise v.fail(_source_of(source, key), key, d[key], "a mapping of settings")
                d[key] = {**default, **d[key]}
        return cls(**validate_config(d, source))

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path), source=f"config file {path}")

    def validate(self, source: str = "TrainConfig") -> "TrainConfig":
        """Check every field (for configs built with the constructor rather than from_dict)."""
        validate_config(dataclasses.asdict(self), source)
        return self


def as_config(config: Union["TrainConfig", Mapping[str, Any], str, Path, None] = None,
              **overrides: Any) -> "TrainConfig":
    """A validated TrainConfig from a TrainConfig, a dict of its fields, a JSON/YAML path or
    None (the defaults), with keyword ``overrides`` applied on top."""
    if config is None:
        config = TrainConfig()
    elif isinstance(config, (str, Path)):
        config = TrainConfig.from_file(config)
    elif isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    else:
        config.validate()
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    return config


def _source_of(source: Union[str, Mapping[str, str], None], key: str) -> str:
    if source is None:
        return ""
    if isinstance(source, str):
        return source
    return source.get(key.split(".")[0], source.get("", ""))


_MODEL_INT_KEYS = dict(base_width=1, out_channels=1, enc_blocks=1, dec_blocks=1, mid_blocks=0, groups=1)


def _validate_model(model: Mapping[str, Any], src) -> Dict[str, Any]:
    out = dict(model)
    allowed = set(_MODEL_INT_KEYS) | {"channel_mult", "time_embed_dim", "time_freq_dim", "dropout", "skip"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise v.unknown_key(_source_of(src, "model"), f"model.{unknown[0]}", model[unknown[0]], allowed)
    for key, lo in _MODEL_INT_KEYS.items():
        if key in model:
            out[key] = v.check_int(model[key], f"model.{key}", _source_of(src, "model"), lo=lo)
    for key in ("time_embed_dim", "time_freq_dim"):
        out[key] = v.check_optional(v.check_int)(model.get(key), f"model.{key}", _source_of(src, "model"), lo=1)
        if out[key] is None:
            out.pop(key)
    if "dropout" in model:
        out["dropout"] = v.check_float(model["dropout"], "model.dropout", _source_of(src, "model"), 0.0, 1.0,
                                       hi_open=True)
    if "skip" in model:
        v.check_choice(model["skip"], "model.skip", ("average", "concat"), _source_of(src, "model"))
    mult = model.get("channel_mult")
    if mult is not None:
        if not isinstance(mult, (list, tuple)) or not mult:
            raise v.fail(_source_of(src, "model"), "model.channel_mult", mult, "a non-empty list of integers >= 1")
        out["channel_mult"] = type(mult)(v.check_int(m, "model.channel_mult", _source_of(src, "model"), lo=1)
                                         for m in mult)
    return out


def _validate_diffusion(diff: Mapping[str, Any], src) -> Dict[str, Any]:
    s = _source_of(src, "diffusion")
    allowed = {"timesteps", "beta_start", "beta_end", "clip_x0", "prediction"}
    unknown = sorted(set(diff) - allowed)
    if unknown:
        raise v.unknown_key(s, f"diffusion.{unknown[0]}", diff[unknown[0]], allowed)
    out = dict(diff)
    out["timesteps"] = v.check_int(diff["timesteps"], "diffusion.timesteps", s, lo=1)
    out["beta_start"] = v.check_float(diff["beta_start"], "diffusion.beta_start", s, 0.0, 1.0, lo_open=True,
                                      hi_open=True)
    out["beta_end"] = v.check_float(diff["beta_end"], "diffusion.beta_end", s, out["beta_start"], 1.0, hi_open=True)
    v.check_bool(diff["clip_x0"], "diffusion.clip_x0", s)
    if "prediction" in diff:
        v.check_choice(diff["prediction"], "diffusion.prediction", PREDICTIONS, s)
    return out


def validate_config(d: Mapping[str, Any], source: Union[str, Mapping[str, str], None] = None) -> Dict[str, Any]:
    """Every TrainConfig value checked for type, range and allowed names; returns the values
    normalised (whole floats to int, numbers to float).  Raises :class:`ConfigError` naming
    the source, key, value and expected form."""
    out = dict(d)
    src = lambda k: _source_of(source, k)  # noqa: E731
    ints = dict(preprocess_workers=1, phantom_size=4, phantom_train=1, phantom_val=0, patch_size=1, steps=1,
                batch_size=1, warmup_steps=0, seed=0, val_every=0, val_steps=1, val_ensemble=1, ckpt_every=0,
                log_every=0)
    for key, lo in ints.items():
        if key in d:
            out[key] = v.check_int(d[key], key, src(key), lo=lo)
    choices = dict(method=METHODS, layout=("auto",) + tuple(LAYOUTS), patch_distribution=OFFSET_DISTRIBUTIONS,
                   lr_schedule=LR_SCHEDULES, precision=PRECISIONS, ops=OPS_BACKENDS, checkpoint=RECOMPUTE_MODES,
                   offload=OFFLOAD_MODES)
    for key, allowed in choices.items():
        if key in d:
            v.check_choice(d[key], key, allowed, src(key))
    if "target" in d:
        v.check_choice(d["target"], "target", TARGETS, src("target"))
    if d.get("label_convention") is not None:
        v.check_choice(d["label_convention"], "label_convention", CONVENTIONS, src("label_convention"))
    for key in ("data", "out_dir"):
        if key in d:
            v.check_str(d[key], key, src(key))
    for key in ("split", "cache_dir"):
        if key in d:
            v.check_optional(v.check_str)(d[key], key, src(key))
    for key in ("resume", "progress"):
        if key in d:
            v.check_bool(d[key], key, src(key))
    if "lr" in d:
        out["lr"] = v.check_float(d["lr"], "lr", src("lr"), 0.0, None, lo_open=True)
    if "weight_decay" in d:
        out["weight_decay"] = v.check_float(d["weight_decay"], "weight_decay", src("weight_decay"), 0.0)
    if "adam_eps" in d:
        out["adam_eps"] = v.check_float(d["adam_eps"], "adam_eps", src("adam_eps"), 0.0, lo_open=True)
    if "grad_clip" in d:
        out["grad_clip"] = v.check_optional(v.check_float)(d["grad_clip"], "grad_clip", src("grad_clip"), 0.0,
                                                            lo_open=True)
    if "ema_decay" in d:
        out["ema_decay"] = v.check_optional(v.check_float)(d["ema_decay"], "ema_decay", src("ema_decay"), 0.0, 1.0,
                                                            lo_open=True, hi_open=True)
    for key in ("val_fraction", "test_fraction"):
        if key in d:
            out[key] = v.check_float(d[key], key, src(key), 0.0, 1.0, hi_open=True)
    if out.get("val_fraction", 0.0) + out.get("test_fraction", 0.0) >= 1.0:
        raise v.fail(src("test_fraction"), "val_fraction + test_fraction",
                     out.get("val_fraction", 0.0) + out.get("test_fraction", 0.0), "a sum < 1 (cases must remain for training)")
    if "betas" in d:
        b = d["betas"]
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise v.fail(src("betas"), "betas", b, "two numbers in [0, 1)")
        out["betas"] = tuple(v.check_float(x, "betas", src("betas"), 0.0, 1.0, hi_open=True) for x in b)
    if "device" in d:
        dev = d["device"]
        if not isinstance(dev, str) or not re.fullmatch(DEVICE_PATTERN, dev):
            raise v.fail(src("device"), "device", dev, "auto, cpu, cuda or cuda:N")
    if d.get("memory_budget") is not None:
        try:
            parse_bytes(d["memory_budget"])
        except (ValueError, TypeError):
            raise v.fail(src("memory_budget"), "memory_budget", d["memory_budget"],
                         "a memory size such as 8GB, 8GiB or 512MB") from None
    if "preprocess" in d:
        pre = d["preprocess"]
        if not isinstance(pre, Mapping):
            raise v.fail(src("preprocess"), "preprocess", pre, "a mapping of preprocessing settings")
        fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
        unknown = sorted(set(pre) - fields)
        if unknown:
            raise v.unknown_key(src("preprocess"), f"preprocess.{unknown[0]}", pre[unknown[0]], fields)
        try:
            PreprocessConfig(**pre)
        except (TypeError, ValueError) as exc:
            raise v.ConfigError(f"{src('preprocess')}: config key 'preprocess' = {dict(pre)!r}: {exc}") from None
    if "model" in d:
        out["model"] = _validate_model(d["model"], source)
    if "diffusion" in d:
        out["diffusion"] = _validate_diffusion(d["diffusion"], source)
    return out


def read_config_file(path) -> Dict[str, Any]:
    """A JSON or YAML mapping, with a clear error naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data
