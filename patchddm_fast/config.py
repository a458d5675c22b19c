"""The run configuration: one dataclass, serialisable to JSON/YAML, shared by API and CLI.

Defaults are the paper's (PAPER.md) wherever the paper says something; the CLI exposes
every field as a flag generated from this dataclass, so there is one source of truth for
names, defaults and help texts.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

PAPER_ARCH: Dict[str, Any] = dict(
    base_width=29, channel_mult=(1, 3, 4, 4, 4, 4, 4), enc_blocks=2, dec_blocks=3, mid_blocks=2, groups=29,
    skip="average",
)
PAPER_DIFFUSION: Dict[str, Any] = dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_x0=True)


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    method: str = _help("patchddm (coordinate-encoded patches), halfres (stride-2 decimated volume), fullres (whole volume) or patches (patches without coordinates, an ablation)", default="patchddm")
    model: Dict[str, Any] = _help("network architecture (UNet3D arguments; the paper's by default)", default_factory=lambda: dict(PAPER_ARCH))
    diffusion: Dict[str, Any] = _help("diffusion schedule (T, linear beta range), x0 clamping and what the network predicts: prediction eps (paper), v or x0", default_factory=lambda: dict(PAPER_DIFFUSION))
    data: str = _help("'phantom' for built-in synthetic BraTS-like cases, or a dataset folder (BraTS / nnU-Net / preprocessed)", default="phantom")
    layout: str = _help("dataset layout: auto, brats2020, brats2023, nnunet or patchddm-preprocessed", default="auto")
    split: Optional[str] = _help("split: a JSON file, a named split (brats2020-reference) or unset for a seeded random split", default=None)
    val_fraction: float = _help("validation fraction of a seeded random split", default=0.1)
    test_fraction: float = _help("test fraction of a seeded random split (never used for training)", default=0.1)
    preprocess: Dict[str, Any] = _help("preprocessing (percentile clipping, target grid; see patchddm_fast.io.preprocess.PreprocessConfig); stored in checkpoints so predict repeats it", default_factory=dict)
    cache_dir: Optional[str] = _help("where preprocessed volumes are cached (default $PATCHDDM_CACHE or ~/.cache/patchddm_fast/volumes)", default=None)
    preprocess_workers: int = _help("processes used to build the preprocessing cache", default=1)
    phantom_size: int = _help("edge length of phantom volumes", default=64)
    phantom_train: int = _help("number of phantom training cases", default=16)
    phantom_val: int = _help("number of phantom validation cases", default=2)
    phantom_options: Dict[str, Any] = _help("keyword arguments of data.phantom.make_phantom for phantom cases, e.g. {\"core\": [0.45, 0.85], \"necrosis\": [0.35, 0.85]} (tumour core and necrosis radius ranges)", default_factory=dict)
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
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if "model" in d:
            d["model"] = {**PAPER_ARCH, **d["model"]}
        if "diffusion" in d:
            d["diffusion"] = {**PAPER_DIFFUSION, **d["diffusion"]}
        return cls(**d)

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path))


def read_config_file(path) -> Dict[str, Any]:
    """A JSON or YAML mapping, with a clear error naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data
