"""The command line: every subcommand has help, train/sample run end to end on tiny settings."""
import json
import subprocess
import sys

import pytest

from patchddm_fast.cli.main import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: patchddm" in out and len(out) > 200


def test_every_command_module_is_registered():
    """Each command module in patchddm_fast/cli (one with ``add_parser``) is reachable from the
    installed `patchddm`; the others (main, showcase) are its machinery."""
    import importlib
    from pathlib import Path

    import patchddm_fast.cli as commands

    stems = [p.stem for p in Path(commands.__file__).parent.glob("*.py") if p.stem != "__init__"]
    modules = {s for s in stems if hasattr(importlib.import_module(f"patchddm_fast.cli.{s}"), "add_parser")}
    assert modules == set(COMMANDS) and {"main", "showcase"} <= set(stems) - modules


def test_memory_and_plan_through_the_cli(capsys):
    assert main(["memory", "--method", "halfres", "--mode", "sample", "--size", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 64 and report["peak_allocated_bytes"] > 0
    assert main(["plan", "--gpu-memory", "40GB", "--method", "halfres", "--mode", "sample", "--size", "64"]) == 0
    assert "settings:" in capsys.readouterr().out


def test_train_flags_cover_config():
    from patchddm_fast.cli.train import config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", "--steps", "3", "--lr", "0.01", "--model", '{"base_width": 16}',
                              "--resume", "false", "--betas", "0.8", "0.9"])
    cfg = config_from_args(args)
    assert cfg.steps == 3 and cfg.lr == 0.01 and cfg.model["base_width"] == 16 and cfg.resume is False
    assert cfg.betas == (0.8, 0.9) and cfg.model["groups"] == 29


def test_train_then_sample_on_phantoms(tmp_path):
    model = '{"base_width": 8, "channel_mult": [1, 2, 2], "enc_blocks": 1, "dec_blocks": 2, "mid_blocks": 1, "groups": 4}'
    rc = main(["train", "--model", model, "--phantom-size", "16", "--phantom-train", "2", "--phantom-val", "1",
               "--patch-size", "8", "--steps", "2", "--out-dir", str(tmp_path / "run"), "--progress", "false",
               "--val-steps", "2", "--device", "cpu"])
    assert rc == 0
    rc = main(["sample", "--model", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "s"),
               "--ensemble", "2", "--sampling-steps", "2", "--quiet"])
    assert rc == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert set(metrics["mean"]) >= {"dice"} and len(metrics["cases"]) == 1
    assert set(metrics["cases"][0]) >= {"case", "dice", "hd95"}
    names = {p.name for p in (tmp_path / "s").iterdir()}
    case = metrics["cases"][0]["case"]
    for suffix in ("image", "gt", "mean", "var", "seg"):
        assert f"{case}_{suffix}.nii.gz" in names
    assert f"{case}_montage.png" in names


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "patchddm_fast.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
