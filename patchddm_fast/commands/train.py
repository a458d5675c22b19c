"""``patchddm train``: every TrainConfig field as a flag, plus an optional config file."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from patchddm_fast.config import TrainConfig, read_config_file


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
    """One flag per TrainConfig field (default None = 'from the config file or the built-in default')."""
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
    return p


def run(args: argparse.Namespace) -> int:
    from patchddm_fast.trainer import Trainer

    trainer = Trainer(config_from_args(args))
    history = trainer.fit()
    print(json.dumps(dict(step=trainer.step, last_loss=history["losses"][-1] if history["losses"] else None,
                          validations=history["validations"][-1:] , checkpoint=history["checkpoint"])))
    return 0
