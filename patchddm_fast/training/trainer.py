"""``Trainer(config).fit()``: train, validate, checkpoint atomically, resume exactly.

The loop is deliberately short (in the spirit of denoising-diffusion-pytorch): draw a
batch and (t, noise) from generators seeded by (seed, step), run the one train step
(:func:`patchddm_fast.diffusion.steps.train_step`: the loss on the mask channel, AdamW
through the precision policy's loss scaler, clipping, the lr schedule), and every so
often validate (Dice on whole held-out volumes sampled with DDIM) and save
``out_dir/last.pt``.  Because each step's randomness depends only on (seed, step), a
resumed run reproduces the uninterrupted run's losses exactly.

Under torchrun (:mod:`patchddm_fast.training.distributed`) the network is wrapped in
DistributedDataParallel; rank r draws samples r*B .. r*B+B-1 of each step's global batch
(every sample keyed by (seed, step, global index)), validation cases are sharded over the
ranks, and rank 0 alone writes the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from patchddm_fast.training.config import TrainConfig, as_config
from patchddm_fast.core.files import atomic_write_text, remove_stale_temp_files
from patchddm_fast.core.runlock import RunLock
from patchddm_fast.core.safe_paths import confined, output_folder
from patchddm_fast.data.regions import check_convention, check_target
from patchddm_fast.data.training_sets import preprocess_config_for
from patchddm_fast.diffusion import steps
from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.eval.metrics import dice
from patchddm_fast.model.execution.policy import ExecutionPlan
from patchddm_fast.model.execution.precision import resolve_precision
from patchddm_fast.sampling.segment import flush_denormals_on_cpu, segment_volume
from patchddm_fast.training import distributed
from patchddm_fast.training.cases import BatchSampler, CaseSource, read_whole, step_generators
from patchddm_fast.training.checkpoint import (NonFiniteWeightsError, build_model, check_weights_match, data_multiple,
                                               load_checkpoint, save_checkpoint)
from patchddm_fast.training.schedule import StepSchedule
from patchddm_fast.training.sources import label_convention, load_cases

RUN_FILES = ("last.pt", "config.json", "log.jsonl", "split.json")  # what fit writes into out_dir


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or weights; nothing non-finite was saved (CLI exit code 3)."""


def planned_config(config: TrainConfig, plan: ExecutionPlan) -> TrainConfig:
    """``config`` with a plan's choices (recompute, offload, ops, precision, patch size) in
    place, so config.json and every checkpoint record what the run executed with."""
    policy = plan.policy
    chosen: Dict[str, Any] = dict(checkpoint=policy.recompute, offload=policy.offload, ops=policy.ops,
                                  precision=plan.precision)
    if plan.patch_size is not None:
        chosen["patch_size"] = plan.patch_size
    return TrainConfig.from_dict({**config.to_dict(), **chosen})


class Trainer:
    """Train a PatchDDM / HalfRes / FullRes model.

    >>> from patchddm_fast import Trainer, TrainConfig
    >>> Trainer(TrainConfig(steps=10, out_dir="runs/x")).fit()   # doctest: +SKIP

    ``config`` may be a :class:`TrainConfig`, a dict of its fields, or a JSON/YAML path.
    Keyword overrides are applied on top (``Trainer(cfg, lr=1e-4)``).
    ``train_cases`` / ``val_cases`` replace the data source named in the config.
    ``plan``: the execution plan to run with (recompute, offload, ops, precision, patch
    size), usually the planner's answer to ``config.memory_budget``; this class never calls
    the planner (``patchddm_fast.Trainer`` and ``patchddm train`` do when a budget is set).
    """

    def __init__(
        self,
        config: Union[TrainConfig, Dict[str, Any], str, Path, None] = None,
        *,
        plan: Optional[ExecutionPlan] = None,
        train_cases: Optional[List[CaseSource]] = None,
        val_cases: Optional[List[CaseSource]] = None,
        **overrides: Any,
    ):
        config = as_config(config, **overrides)
        if plan is not None:
            config = planned_config(config, plan)
        check_target(config.target)
        if config.label_convention is not None:
            check_convention(config.label_convention)
        self.config = config
        self.plan = plan
        self.out_dir = Path(config.out_dir)
        self.dist, self.device = distributed.init(config.device)
        flush_denormals_on_cpu(self.device)
        self.diffusion = Diffusion(**config.diffusion)
        torch.manual_seed(config.seed)  # initial weights
        self.model = build_model(config.to_dict()).to(self.device)
        self.net: torch.nn.Module = self.model  # DistributedDataParallel(model) once fit() starts on several ranks
        self._resolve_preprocess()
        if config.offload != "none":
            self.model.apply_policy(dataclasses.replace(self.model.policy, offload=config.offload))
        self._train_cases, self._val_cases = train_cases, val_cases
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, betas=tuple(config.betas), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.schedule = StepSchedule(self.optimizer, config.lr, config.steps, config.lr_schedule,
                                     config.warmup_steps)
        self.precision = resolve_precision(config.precision, self.device)
        # The weights' exponential moving average (torch's AveragedModel with its EMA rule), the
        # weights validation and prediction sample with when config.ema_decay is set.
        self.ema: Optional[AveragedModel] = None
        if config.ema_decay:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
        self.step = 0
        self._saved_step: Optional[int] = None  # step of the newest finite checkpoint in out_dir
        self.losses: List[float] = []
        self.validations: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def _resolve_preprocess(self) -> None:
        """Store the effective preprocessing (defaults filled in, the network's size multiple)
        in the config, so every checkpoint says exactly what ``predict`` must repeat; an
        empty dict would leave predict guessing (and warning) for a default-trained model."""
        multiple = data_multiple(self.config.to_dict())
        self.config.preprocess = preprocess_config_for(self.config.preprocess, multiple).to_dict()

    def _load_cases(self):
        multiple = data_multiple(self.config.to_dict())
        if self._train_cases is None:
            self._train_cases, loaded_val = load_cases(self.config, multiple)
            if self._val_cases is None:
                self._val_cases = loaded_val
        if self.config.target == "regions" and self.config.label_convention is None:
            # Stored in config.json and every checkpoint: predict writes labels in this convention.
            self.config.label_convention = label_convention(self.config)
        return self._train_cases, self._val_cases or []

    def _state(self) -> Dict[str, Any]:
        return dict(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.precision.scaler.state_dict(),
            schedule=self.schedule.state_dict(),
            **(dict(ema=self.ema.state_dict()) if self.ema is not None else {}),
            step=self.step,
            losses=torch.tensor(self.losses, dtype=torch.float64),
            validations_json=json.dumps(self.validations),
            world_size=self.dist.world_size,
        )

    def save(self, path: Optional[Path] = None) -> Path:
        """Write the checkpoint (rank 0 only under DDP: the ranks' states are identical)."""
        path = Path(path) if path else self.out_dir / "last.pt"
        if not self.dist.is_main:
            return path
        try:
            save_checkpoint(path, self._state(), self.config.to_dict())
        except NonFiniteWeightsError:
            raise self._divergence(f"the weights became NaN/Inf after step {self.step}") from None
        if path == self.out_dir / "last.pt":
            self._saved_step = self.step
        return path

    def load(self, path: Path) -> None:
        state, config = load_checkpoint(path, map_location=self.device)
        if config.get("model") != self.config.to_dict()["model"] or config.get("method") != self.config.method:
            raise ValueError(f"checkpoint {path} was trained with a different method/architecture than this config")
        check_weights_match(self.model, state["model"], path, config)
        distributed.check_resume_world(path, int(state.get("world_size", 1)), int(config.get("batch_size", 1)),
                                       self.dist.world_size, self.config.batch_size)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"checkpoint {path} has no weight average; resume without ema_decay, or start over")
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        # The schedule continues at the saved step with this config's lr (checkpoints from before
        # the schedule was saved: the step is its position).
        self.schedule.load_state_dict(state.get("schedule", dict(last_epoch=self.step)))
        self.losses = [float(v) for v in state["losses"]]
        self.validations = json.loads(state.get("validations_json", "[]"))
        self._saved_step = self.step

    # ------------------------------------------------------------------ training
    def train_step(self, sampler: BatchSampler) -> float:
        """One optimiser step of :func:`patchddm_fast.diffusion.steps.train_step` on this step's batch."""
        cond, x0, t, noise = self.draw_batch(sampler, distributed.global_indices(self.dist, self.config.batch_size))
        inputs = dict(cond=cond, x0=x0, t=t, noise=noise)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self.model.train()
        reported: List[torch.Tensor] = []

        def check_loss(loss: torch.Tensor) -> None:
            # Every rank checks the same (global batch) loss, so all stop together on a non-finite one.
            value = distributed.mean_over_ranks(loss, self.dist)
            if not torch.isfinite(value):
                raise self._divergence(f"the loss of step {self.step + 1} became {value.item()}")
            reported.append(value)

        steps.train_step(self.net, self.diffusion, self.optimizer, self.precision, inputs,
                         grad_clip=self.config.grad_clip, schedule=self.schedule, check_loss=check_loss,
                         ema=self.ema)
        self.step += 1
        value = float(reported[0])
        self.losses.append(value)
        return value

    @property
    def inference_model(self) -> torch.nn.Module:
        """The network to sample with: the weights' moving average when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model

    def draw_batch(self, sampler: BatchSampler, indices) -> Tuple[torch.Tensor, ...]:
        """(cond, x0, t, noise) of the given global sample indices of this step.

        Each sample has its own generators keyed by (seed, step, index); index 0 is the
        (seed, step) draw of batch-1 runs, so those are unchanged.  (Batch > 1 before data
        parallelism drew all samples from one (seed, step) stream, so its samples differ.)"""
        parts = []
        for index in indices:
            rng, gen = step_generators(self.config.seed, self.step, index)
            cond, x0 = sampler.batch(rng, 1)
            t = self.diffusion.sample_t(1, generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            parts.append((cond, x0, t, noise))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(column) for column in zip(*parts))

    def validate(self, cases: List[CaseSource]) -> Dict[str, Any]:
        """Dice of every case; on several ranks each rank segments its share and all see all scores."""
        scores = []
        for case in distributed.shard(cases, self.dist):
            image, label = read_whole(case)
            result = segment_volume(
                self.inference_model, self.diffusion, image, method=self.config.method,
                ensemble=self.config.val_ensemble, steps=self.config.val_steps, seed=self.config.seed,
                progress=False,
            )
            whole_tumour = result.mask[0] if result.mask.dim() == 4 else result.mask  # WT channel of regions
            scores.append(dice(whole_tumour.numpy(), label.numpy()))
        scores = distributed.gather_in_order(scores, len(cases), self.dist)
        record = dict(step=self.step, dice=float(np.mean(scores)) if scores else float("nan"), per_case=scores)
        self.validations.append(record)
        return record

    def fit(self) -> Dict[str, Any]:
        """Train to ``config.steps`` (resuming from out_dir/last.pt if allowed); returns the history.

        Holds the run folder's lock throughout (a second process on the same folder is
        refused) and first removes temp files that killed checkpoint writes left behind.
        """
        if not self.dist.is_main:  # distributed: rank 0 alone writes the run folder and holds its lock
            return self._fit()
        output_folder(self.out_dir, "out_dir")
        for name in RUN_FILES:
            confined(self.out_dir, name)
        with RunLock(self.out_dir):
            remove_stale_temp_files(self.out_dir)
            return self._fit()

    def _fit(self) -> Dict[str, Any]:
        cfg = self.config
        train_cases, val_cases = self._load_cases()
        last = self.out_dir / "last.pt"
        distributed.agree(lambda: self.load(last) if cfg.resume and last.exists() else None, self.dist)
        distributed.same_on_all_ranks(self.step, f"the step resumed from {last}", self.dist)
        self.net = distributed.wrap_ddp(self.model, self.dist, self.device)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.json",
                              json.dumps(dict(cfg.to_dict(), world_size=self.dist.world_size), indent=2))
            self._truncate_log()
        sampler = BatchSampler(train_cases, cfg.method, cfg.patch_size, cfg.patch_distribution,
                               target=cfg.target, convention=cfg.label_convention or "brats2020")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                   disable=not (cfg.progress and self.dist.is_main))
        t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                distributed.maybe_inject_fault(self.dist, self.step)
                loss = self._step(sampler)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.log_every and self.step % cfg.log_every == 0:
                    self._log(dict(step=self.step, loss=float(np.mean(self.losses[-cfg.log_every:])),
                                   elapsed_s=round(time.perf_counter() - t0, 3)))
                if cfg.val_every and self.step % cfg.val_every == 0 and val_cases:
                    rec = self.validate(val_cases)
                    self._log(dict(step=self.step, val_dice=rec["dice"]))
                    if self.dist.is_main:
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

    def _step(self, sampler: BatchSampler) -> float:
        """One step; under DDP a failed collective (dead or hung peer) becomes a one-line error.
        Out of memory passes through (the CLI answers it with the planner's advice)."""
        if not self.dist.enabled:
            return self.train_step(sampler)
        try:
            return self.train_step(sampler)
        except (FloatingPointError, ValueError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            raise distributed.collective_failure(exc, self.dist, self.step) from exc

    # ------------------------------------------------------------------ plumbing
    def _log(self, record: Dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.out_dir / "log.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # disk full / file-size limit: name the file (a cut line is skipped on resume)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc

    def _divergence(self, what: str) -> DivergenceError:
        cfg = self.config
        last = self.out_dir / "last.pt"
        if self._saved_step is not None:
            kept = (f"{last} keeps the last finite state (step {self._saved_step}); resume from it with a lower "
                    f"learning rate, e.g. `patchddm train --out-dir {self.out_dir} --lr {cfg.lr / 10:g}` with the same "
                    f"other settings (the new lr applies from step {self._saved_step} on); if that diverges at once, "
                    f"the saved state is already spoiled: start over with --resume false")
        else:
            kept = (f"no checkpoint was written; start again with a lower learning rate, e.g. --lr {cfg.lr / 10:g}")
        hint = "" if self.precision.dtype == torch.float32 else ", or --precision fp32"
        return DivergenceError(f"training diverged: {what} (lr {cfg.lr:g}). {kept}{hint}. "
                               f"Nothing non-finite was saved.")

    def _truncate_log(self) -> None:
        """After a resume, drop log lines written past the checkpoint so the log matches the state.

        Tolerant: a line that is not JSON (an append cut short by a full disk or a file-size
        limit) is dropped with a warning naming the file, instead of failing every resume.
        """
        log = self.out_dir / "log.jsonl"
        if not log.exists():
            return
        keep = []
        for number, line in enumerate(log.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                print(f"warning: {log}: line {number} is not valid JSON (a write cut short?); dropped it",
                      file=sys.stderr)
                continue
            if isinstance(record, dict) and record.get("step", 0) <= self.step:
                keep.append(line)
        atomic_write_text(log, "".join(line + "\n" for line in keep))
