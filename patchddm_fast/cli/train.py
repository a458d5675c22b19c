"""``patchddm train``: every TrainConfig field as a flag, plus an optional config file."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from patchddm_fast.training.config import TrainConfig, read_config_file


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"base_width\": 16}}': {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_config_flags(parser: argparse.ArgumentParser, skip=()) -> None:
    """One flag per TrainConfig field (default None = 'from the config file or the built-in default').

    Why not tyro / jsonargparse / simple-parsing, which generate flags from dataclasses too: the
    flags here are already generated from the one dataclass (names, types, defaults, help), in
    about 30 lines; those libraries would add a dependency, and none reports a bad value the way
    a user needs it here -- naming the config file *or* the flag it came from (see
    ``config_from_args``).  The nested sections (model, diffusion, preprocess, phantom_options)
    are JSON objects on the command line, checked key by key against what their consumers
    accept by ``training.config.validate_config``.
    """
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings; flags override it")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        kwargs = dict(default=None, help=f"{f.metadata.get('help', '')} (default: {json.dumps(default)})")
        flag = "--" + f.name.replace("_", "-")
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif origin in (dict, typing.Dict) or hint is dict:
            kwargs.update(type=_parse_json_dict, metavar="JSON")
        elif origin in (tuple, typing.Tuple):
            kwargs.update(type=float, nargs=len(args), metavar="F")
        else:
            base = [a for a in args if a is not type(None)][0] if origin is typing.Union else hint
            kwargs.update(type=base)
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace, **fixed) -> TrainConfig:
    """Config file values, then flags on top; errors name the file or the flag a bad value came from."""
    config_file = getattr(args, "config", None)
    values = read_config_file(config_file) if config_file else {}
    sources = {"": "settings"}
    sources.update({k: f"config file {config_file}" for k in values})
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
            sources[f.name] = "flag --" + f.name.replace("_", "-")
    values.update(fixed)
    return TrainConfig.from_dict(values, source=sources)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a PatchDDM / HalfRes / FullRes model",
        description="Train a diffusion segmentation model. Settings come from --config FILE (JSON/YAML) and "
        "the flags below (flags win). Resumes from OUT_DIR/last.pt when it exists.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(p)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel on N processes of this machine (one per GPU, or N CPU processes with "
                        "gloo): launches `torchrun --standalone --nproc_per_node N -m patchddm_fast train ...`; the "
                        "global batch is N x batch-size. Several machines: run torchrun yourself (see README)")
    return p


def launch_torchrun(config: TrainConfig, nproc: int) -> int:
    """Run this training under ``torch.distributed.run`` with ``nproc`` local processes; returns its exit code.

    The resolved settings travel as a JSON config file, so every rank trains exactly the
    configuration this command line describes."""
    import os
    import subprocess
    import sys
    import tempfile

    fd, path = tempfile.mkstemp(prefix="patchddm-train-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "patchddm_fast", "train", "--config", path]
        return subprocess.call(cmd)
    finally:
        os.unlink(path)


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.analysis.planner import plan_training
    from patchddm_fast.cli.sample import planner_advice_on_oom
    from patchddm_fast.training import distributed
    from patchddm_fast.training.trainer import Trainer

    config = config_from_args(args)
    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if distributed.launched_by_torchrun():
            raise ValueError("--nproc launches torchrun itself; under torchrun leave it out")
        if args.nproc > 1:
            return launch_torchrun(config, args.nproc)
    # With --memory-budget the planner picks recompute/offload/precision/patch size (per rank under torchrun).
    plan = plan_training(config, ddp=distributed.env_world_size() > 1) if config.memory_budget else None
    with planner_advice_on_oom(config.method, "train"):
        trainer = Trainer(config, plan=plan)
        history = trainer.fit()
    if trainer.dist.is_main:
        print(json.dumps(dict(step=trainer.step, last_loss=history["losses"][-1] if history["losses"] else None,
                              validations=history["validations"][-1:], checkpoint=history["checkpoint"],
                              world_size=trainer.dist.world_size)))
    distributed.shutdown(trainer.dist)
    return 0
