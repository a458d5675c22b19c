"""``Trainer(config).fit()``: train, validate, checkpoint atomically, resume exactly.

The loop is deliberately short (in the spirit of denoising-diffusion-pytorch): draw a
batch and (t, noise) from generators seeded by (seed, step), compute the epsilon MSE on
the mask channel, step AdamW through the precision policy's loss scaler, and every so
often validate (Dice on whole held-out volumes sampled with DDIM) and save
``out_dir/last.pt``.  Because each step's randomness depends only on (seed, step), a
resumed run reproduces the uninterrupted run's losses exactly.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from patchddm_fast.checkpoint import build_model, load_checkpoint, save_checkpoint
from patchddm_fast.conditioning import network_input
from patchddm_fast.config import TrainConfig
from patchddm_fast.data.cases import BatchSampler, CaseSource, read_whole, step_generators
from patchddm_fast.diffusion import Diffusion
from patchddm_fast.metrics import dice
from patchddm_fast.sampling import flush_denormals_on_cpu, segment_volume


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(base: float, step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``.

    A pure function of the step, so a resumed run follows the same schedule exactly.
    ``cosine`` decays from ``base`` to 0 at the last step (after the warm-up).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return base
    progress = (step - warmup) / (total - warmup - 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Train a PatchDDM / HalfRes / FullRes model.

    >>> from patchddm_fast import Trainer, TrainConfig
    >>> Trainer(TrainConfig(steps=10, out_dir="runs/x")).fit()   # doctest: +SKIP

    ``config`` may be a :class:`TrainConfig`, a dict of its fields, or a JSON/YAML path.
    Keyword overrides are applied on top (``Trainer(cfg, memory_budget="8GB")``).
    ``train_cases`` / ``val_cases`` replace the data source named in the config.
    """

    def __init__(
        self,
        config: Union[TrainConfig, Dict[str, Any], str, Path, None] = None,
        *,
        train_cases: Optional[List[CaseSource]] = None,
        val_cases: Optional[List[CaseSource]] = None,
        **overrides: Any,
    ):
        if config is None:
            config = TrainConfig()
        elif isinstance(config, (str, Path)):
            config = TrainConfig.from_file(config)
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if overrides:
            config = TrainConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = resolve_device(config.device)
        flush_denormals_on_cpu(self.device)
        if config.memory_budget:
            self._apply_memory_plan()
            config = self.config  # the planner's settings from here on
        self.diffusion = Diffusion(**config.diffusion)
        torch.manual_seed(config.seed)  # initial weights
        self.model = build_model(config.to_dict()).to(self.device)
        self._resolve_preprocess()
        if config.offload != "none":
            from patchddm_fast.memory import configure

            configure(self.model, offload=config.offload)
        self._train_cases, self._val_cases = train_cases, val_cases
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        learning_rate(config.lr, 0, config.steps, config.lr_schedule, config.warmup_steps)  # bad names fail here
        from patchddm_fast.precision import resolve_precision

        self.precision = resolve_precision(config.precision, self.device)
        self.step = 0
        self.losses: List[float] = []
        self.validations: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def _apply_memory_plan(self) -> None:
        """Let the planner choose checkpointing/precision/patch size for the memory budget."""
        from patchddm_fast.memory.planner import plan, planner_arch

        cfg = self.config
        arch = planner_arch(cfg.model)
        multiple = 2 ** (len(arch["channel_mult"]) - 1)
        patch_sizes = tuple(s for s in (cfg.patch_size, cfg.patch_size // 2) if s >= multiple and s % multiple == 0)
        p = plan(cfg.memory_budget, preset=cfg.method, mode="train", precision=cfg.precision, patch_sizes=patch_sizes,
                 model_kwargs=arch)
        if not p.fits:
            raise RuntimeError(p.format_text())
        settings = {k: v for k, v in p.settings.items()
                    if k in {"checkpoint", "offload", "precision", "patch_size", "ops"} and v is not None}
        self.config = TrainConfig.from_dict({**self.config.to_dict(), **settings})
        self.memory_plan = p

    def _resolve_preprocess(self) -> None:
        """Store the effective preprocessing (defaults filled in, the network's size multiple)
        in the config, so every checkpoint says exactly what ``predict`` must repeat; an
        empty dict would leave predict guessing (and warning) for a default-trained model."""
        from patchddm_fast.io.training import preprocess_config_for

        multiple = self.model.size_multiple * (2 if self.config.method == "halfres" else 1)
        self.config.preprocess = preprocess_config_for(self.config.preprocess, multiple).to_dict()

    def _load_cases(self):
        from patchddm_fast.data.sources import load_cases

        multiple = self.model.size_multiple * (2 if self.config.method == "halfres" else 1)
        if self._train_cases is None:
            self._train_cases, loaded_val = load_cases(self.config, multiple)
            if self._val_cases is None:
                self._val_cases = loaded_val
        return self._train_cases, self._val_cases or []

    def _state(self) -> Dict[str, Any]:
        return dict(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.precision.scaler.state_dict(),
            step=self.step,
            losses=torch.tensor(self.losses, dtype=torch.float64),
            validations_json=json.dumps(self.validations),
        )

    def save(self, path: Optional[Path] = None) -> Path:
        path = Path(path) if path else self.out_dir / "last.pt"
        save_checkpoint(path, self._state(), self.config.to_dict())
        return path

    def load(self, path: Path) -> None:
        state, config = load_checkpoint(path, map_location=self.device)
        if config.get("model") != self.config.to_dict()["model"] or config.get("method") != self.config.method:
            raise ValueError(f"checkpoint {path} was trained with a different method/architecture than this config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]
        self.validations = json.loads(state.get("validations_json", "[]"))

    # ------------------------------------------------------------------ training
    def train_step(self, sampler: BatchSampler) -> float:
        rng, gen = step_generators(self.config.seed, self.step)
        cond, x0 = sampler.batch(rng, self.config.batch_size)
        t = self.diffusion.sample_t(cond.shape[0], generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        cond, x0, t, noise = (v.to(self.device) for v in (cond, x0, t, noise))
        self.model.train()
        with self.precision.autocast():
            loss = self.diffusion.training_loss(self.model, cond, x0, t, noise, network_input)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower the learning rate or use --precision fp32/bf16")
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        scaler.scale(loss).backward()
        if self.config.grad_clip:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        lr = learning_rate(self.config.lr, self.step, self.config.steps, self.config.lr_schedule,
                           self.config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scaler.step(self.optimizer)
        scaler.update()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def validate(self, cases: List[CaseSource]) -> Dict[str, Any]:
        scores = []
        for case in cases:
            image, label = read_whole(case)
            result = segment_volume(
                self.model, self.diffusion, image, method=self.config.method,
                ensemble=self.config.val_ensemble, steps=self.config.val_steps, seed=self.config.seed,
                progress=False,
            )
            scores.append(dice(result.mask.numpy(), label.numpy()))
        record = dict(step=self.step, dice=float(np.mean(scores)) if scores else float("nan"), per_case=scores)
        self.validations.append(record)
        return record

    def fit(self) -> Dict[str, Any]:
        """Train to ``config.steps`` (resuming from out_dir/last.pt if allowed); returns the history."""
        cfg = self.config
        train_cases, val_cases = self._load_cases()
        last = self.out_dir / "last.pt"
        if cfg.resume and last.exists():
            self.load(last)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self._truncate_log()
        sampler = BatchSampler(train_cases, cfg.method, cfg.patch_size, cfg.patch_distribution)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", disable=not cfg.progress)
        t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                loss = self._oom_guard(self.train_step, sampler)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.log_every and self.step % cfg.log_every == 0:
                    self._log(dict(step=self.step, loss=float(np.mean(self.losses[-cfg.log_every:])),
                                   elapsed_s=round(time.perf_counter() - t0, 3)))
                if cfg.val_every and self.step % cfg.val_every == 0 and val_cases:
                    rec = self.validate(val_cases)
                    self._log(dict(step=self.step, val_dice=rec["dice"]))
                    bar.write(f"step {self.step}: validation Dice {rec['dice']:.4f}")
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
        finally:
            bar.close()
        if val_cases and not (self.validations and self.validations[-1]["step"] == self.step):
            rec = self.validate(val_cases)
            self._log(dict(step=self.step, val_dice=rec["dice"]))
        self.save()
        return dict(losses=self.losses, validations=self.validations, checkpoint=str(last))

    # ------------------------------------------------------------------ plumbing
    def _oom_guard(self, fn, *args):
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError as exc:
            from patchddm_fast.memory import oom_advice

            raise RuntimeError(oom_advice(exc, preset=self.config.method, mode="train")) from exc

    def _log(self, record: Dict[str, Any]) -> None:
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """After a resume, drop log lines written past the checkpoint so the log matches the state."""
        log = self.out_dir / "log.jsonl"
        if not log.exists():
            return
        keep = [line for line in log.read_text().splitlines() if line and json.loads(line).get("step", 0) <= self.step]
        log.write_text("".join(line + "\n" for line in keep))
