"""Hostile inputs and conditions (issue 12): one test per class of the audit.

Every test asserts the exit code, that the one-line message names the file or key and the
problem (and holds no traceback), and that nothing outside the output folder changed: the
whole test folder is hashed before and after, the output folder excluded.  The training
runs are tiny (2-level network of width 8, 16^3 phantoms, 8^3 patches, a few steps).
"""
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from patchddm_fast.training.checkpoint import load_checkpoint, state_digest
from patchddm_fast.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = '{"base_width": 8, "channel_mult": [1, 2], "enc_blocks": 1, "dec_blocks": 2, "mid_blocks": 1, "groups": 4}'
TINY = ["--model", MODEL, "--phantom-size", "16", "--phantom-train", "2", "--phantom-val", "1", "--patch-size", "8",
        "--progress", "false", "--device", "cpu", "--val-steps", "1", "--log-every", "1", "--val-every", "0"]


# ----------------------------------------------------------------------------- helpers
def snapshot(root: Path, exclude=()):
    """{relative path: sha256 (or link target)} of every file and link under ``root`` except ``exclude``."""
    root = Path(root)
    skip = [Path(e).resolve() for e in exclude]
    out = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if (here / d).is_symlink() or (here / d).resolve() not in skip]
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            p = here / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(argv, capsys):
    """(exit code, stderr) of the CLI in this process; a parse error counts as its exit code."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def last_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def subprocess_env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATCHDDM_CRASH_DIR=str(tmp_path / "crashes"))
    return env


def cli_cmd(*argv):
    return [sys.executable, "-m", "patchddm_fast.cli.main", *map(str, argv)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny checkpoint (2 steps) and a one-case NIfTI dataset."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATCHDDM_CRASH_DIR", str(root / "crashes"))
        assert main(["train", *TINY, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(root / "run")]) == 0
    from synthetic_data import write_phantom_dataset

    write_phantom_dataset(root / "ds", 1, (16, 16, 16))
    case = root / "ds" / "BraTS20_Training_001"
    return dict(ckpt=root / "run" / "last.pt", case=case,
                files=[case / f"BraTS20_Training_001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")])


@pytest.fixture
def world(tmp_path, trained, monkeypatch):
    """A private copy of the checkpoint and dataset under tmp_path (so the tree hash covers them)."""
    monkeypatch.setenv("PATCHDDM_CRASH_DIR", str(tmp_path / "crashes"))
    monkeypatch.setenv("PATCHDDM_CACHE", str(tmp_path / "cache"))
    shutil.copy(trained["ckpt"], tmp_path / "model.pt")
    shutil.copytree(trained["case"].parent, tmp_path / "ds")
    case = tmp_path / "ds" / "BraTS20_Training_001"
    return dict(root=tmp_path, ckpt=tmp_path / "model.pt", case=case,
                files=[case / f"BraTS20_Training_001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")])


def predict_args(w, out, *extra):
    return ["predict", "--model", w["ckpt"], "--input", w["case"], "--out", out, "--ensemble", 1, "--steps", 1,
            "--quiet", *extra]


# ----------------------------------------------------------------------------- 1. writes outside --out
@pytest.mark.parametrize("case_id,problem", [
    ("../escaped", "path separator"), ("/tmp/abs", "path separator"), ("..", "'..'"),
    ("a\x1b[2Jb", "control characters"), ("sub\\dir", "path separator"),
])
def test_case_id_cannot_leave_the_output_folder(world, capsys, case_id, problem):
    before = snapshot(world["root"])
    out = world["root"] / "out"
    rc, err = run(["predict", "--model", world["ckpt"], "--input", *world["files"], "--case-id", case_id,
                   "--out", out, "--quiet"], capsys)
    assert rc == 2 and "case id" in err and problem in err and repr(case_id) in err
    assert snapshot(world["root"]) == before and not out.exists()


def test_ground_truth_is_never_overwritten_through_a_missing_folder(world, capsys):
    """The audit's data loss: --case-id ../<dataset>/<case>/<case> into a not-yet-existing --out."""
    before = snapshot(world["root"])
    cid = "../../ds/BraTS20_Training_001/BraTS20_Training_001"
    rc, err = run(["predict", "--model", world["ckpt"], "--input", *world["files"], "--case-id", cid,
                   "--out", world["root"] / "new" / "deeper", "--overwrite", "--quiet"], capsys)
    assert rc == 2 and "case id" in err and "path separator" in err
    assert snapshot(world["root"]) == before


def test_symlinked_output_pointing_at_an_input_is_refused(world, capsys):
    out = world["root"] / "out"
    out.mkdir()
    os.symlink(world["case"] / "BraTS20_Training_001_seg.nii.gz", out / "BraTS20_Training_001_seg.nii.gz")
    before = snapshot(world["root"])
    rc, err = run(predict_args(world, out, "--overwrite"), capsys)
    assert rc == 2 and "BraTS20_Training_001_seg.nii.gz" in err and "outside the output folder" in err
    assert snapshot(world["root"]) == before


def test_existing_outputs_need_overwrite_and_inputs_never(world, capsys):
    out = world["root"] / "out"
    assert run(predict_args(world, out), capsys)[0] == 0
    before = snapshot(world["root"])
    rc, err = run(predict_args(world, out), capsys)
    assert rc == 2 and "exist already" in err and "--overwrite" in err and str(out) in err
    assert snapshot(world["root"]) == before
    # evaluate: an existing metrics file (or figure) needs --overwrite; a ground-truth file is never replaced
    metrics = world["root"] / "m" / "metrics.json"
    ev = ["evaluate", "--pred", out, "--gt", world["root"] / "ds", "--out", metrics, "--figures", "--quiet"]
    assert run(ev, capsys)[0] == 0
    written = snapshot(world["root"])
    rc, err = run(ev, capsys)
    assert rc == 2 and "exist already" in err and str(metrics.parent) in err and snapshot(world["root"]) == written
    assert run(ev + ["--overwrite"], capsys)[0] == 0
    gt = world["case"] / "BraTS20_Training_001_seg.nii.gz"
    rc, err = run(["evaluate", "--pred", out, "--gt", world["root"] / "ds", "--out",
                   world["case"] / "BraTS20_Training_001_seg.nii.gz", "--overwrite", "--quiet"], capsys)
    assert rc == 2 and "refusing to overwrite an input file" in err
    assert hashlib.sha256(gt.read_bytes()).hexdigest() == before[str(gt.relative_to(world["root"]))]


# ----------------------------------------------------------------------------- 2. two runs, one folder
def _wait_for(predicate, timeout, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_second_training_process_on_one_folder_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path)
    first = subprocess.Popen(cli_cmd("train", *TINY, "--steps", 100000, "--ckpt-every", 2, "--lr", "0.001",
                                     "--seed", 0, "--out-dir", run_dir),
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (run_dir / ".lock").exists() and (run_dir / ".lock").stat().st_size > 0, 240, first), \
            first.stderr.read()
        second = subprocess.run(cli_cmd("train", *TINY, "--steps", 5, "--lr", "0.01", "--seed", 1, "--out-dir",
                                        run_dir), env=env, capture_output=True, text=True, timeout=240)
        assert first.poll() is None, "the first run must still be running while the second is refused"
        assert second.returncode == 2 and "Traceback" not in second.stderr
        msg = last_line(second.stderr)
        assert str(run_dir) in msg and f"pid {first.pid}" in msg and socket.gethostname() in msg and "in use" in msg
        assert _wait_for(lambda: (run_dir / "last.pt").exists(), 240, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    state, config = load_checkpoint(run_dir / "last.pt")  # digest verified: intact
    assert config["seed"] == 0 and config["lr"] == 0.001 and state["step"] % 2 == 0 and state["step"] >= 2
    steps = [json.loads(l)["step"] for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()
             and l.strip().endswith("}")]
    assert steps == list(range(1, len(steps) + 1)), "log.jsonl holds one run's lines only"


def test_kill_9_at_a_random_moment_resumes_bit_exactly(tmp_path, capsys):
    """A real SIGKILL (possibly mid-checkpoint-write), then a resume: losses equal an uninterrupted run's."""
    steps = 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess: the same kernels' reduction order
    args = [*TINY, "--steps", steps, "--ckpt-every", 1, "--lr", "0.001", "--lr-schedule", "cosine"]
    proc = subprocess.Popen(cli_cmd("train", *args, "--out-dir", tmp_path / "killed"), env=subprocess_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: (tmp_path / "killed" / "last.pt").exists(), 240, proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        assert run(["train", *args, "--out-dir", tmp_path / "killed"], capsys)[0] == 0
        assert run(["train", *args, "--out-dir", tmp_path / "whole"], capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")[0]["losses"]
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")[0]["losses"]
    assert len(whole) == steps and torch.equal(resumed, whole)
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 3. checkpoint integrity
def _rewrite(src: Path, dst: Path, edit, digest=True):
    payload = torch.load(src, weights_only=True)
    edit(payload)
    if digest:
        payload["sha256"] = state_digest(payload)
    torch.save(payload, dst)


def _flip_exponents(payload):
    w = payload["model"]["conv_in.weight"]
    bits = w.view(torch.int32).reshape(-1)
    bits[:100] ^= 1 << 29  # an exponent bit of 100 stored weights (values stay finite)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name,edit,digest,expected", [
    ("nan.pt", lambda p: p["model"]["conv_in.weight"].view(-1).__setitem__(0, float("nan")), True, "non-finite weights"),
    ("flipped.pt", _flip_exponents, False, "damaged: its contents do not match the sha256 digest"),
    ("mismatch.pt", lambda p: p.__setitem__("config_json", p["config_json"].replace('"base_width": 8', '"base_width": 16')),
     True, "does not match its weights"),
    ("nomethod.pt", lambda p: p.__setitem__("config_json", json.dumps({k: v for k, v in json.loads(p["config_json"]).items()
                                                                       if k != "method"})), True, "lacks 'method'"),
])
def test_damaged_checkpoints_are_refused(world, capsys, name, edit, digest, expected):
    bad = world["root"] / name
    _rewrite(world["ckpt"], bad, edit, digest)
    before = snapshot(world["root"])
    out = world["root"] / "out"
    rc, err = run(["predict", "--model", bad, "--input", world["case"], "--out", out, "--quiet"], capsys)
    msg = last_line(err)
    assert rc == 2 and str(bad) in msg and expected in msg and len(err.strip().splitlines()) == 1
    assert snapshot(world["root"], exclude=[out]) == before


@pytest.mark.parametrize("content,expected", [(b"", "is empty (0 bytes)"), (b"101\nhello\n", "a text file"),
                                              (b"PK\x03\x04garbage", "truncated or damaged")])
def test_files_that_are_not_checkpoints(world, capsys, content, expected):
    bad = world["root"] / "bad.pt"
    bad.write_bytes(content)
    before = snapshot(world["root"])
    rc, err = run(["sample", "--model", bad, "--out", world["root"] / "s", "--quiet"], capsys)
    assert rc == 2 and str(bad) in last_line(err) and expected in last_line(err)
    assert snapshot(world["root"]) == before


class Payload:
    """Stands for an attacker's object: unpickling it would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickled_objects_and_folders_are_not_loaded(world, capsys, monkeypatch):
    monkeypatch.chdir(world["root"])
    evil = world["root"] / "evil.pt"
    torch.save({"model": {}, "config_json": "{}", "x": Payload()}, evil)
    folder = world["root"] / "folder.pt"
    folder.mkdir()
    before = snapshot(world["root"])
    for bad, expected in ((evil, "cannot be read safely"), (folder, "is not a file")):
        rc, err = run(["sample", "--model", bad, "--out", world["root"] / "s", "--quiet"], capsys)
        assert rc == 2 and str(bad) in last_line(err) and expected in last_line(err)
    assert not (world["root"] / "pwned.txt").exists()
    assert snapshot(world["root"]) == before


def test_format_1_checkpoints_without_digest_still_load(world):
    from patchddm_fast.training.checkpoint import load_for_inference

    old = world["root"] / "old.pt"
    _rewrite(world["ckpt"], old, lambda p: (p.pop("sha256"), p.__setitem__("format_version", 1)), digest=False)
    model, _, config = load_for_inference(old)
    ref, _, _ = load_for_inference(world["ckpt"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_sampler_stops_on_non_finite_network_output(world, capsys):
    """Huge but finite weights: the network overflows; the sampler says so instead of writing an empty mask."""
    huge = world["root"] / "huge.pt"

    def blow_up(p):
        for k, t in p["model"].items():
            if t.is_floating_point() and k.endswith("weight"):
                t.fill_(3e37)
    _rewrite(world["ckpt"], huge, blow_up)
    before = snapshot(world["root"])
    out = world["root"] / "out"
    rc, err = run(["predict", "--model", huge, "--input", world["case"], "--out", out, "--ensemble", 1, "--steps", 1,
                   "--quiet"], capsys)
    assert rc == 2 and str(huge) in last_line(err) and "non-finite values" in last_line(err)
    assert not list(out.glob("*_seg.nii.gz"))
    assert snapshot(world["root"], exclude=[out]) == before


# ----------------------------------------------------------------------------- 4. divergence
def test_divergence_exits_3_keeps_the_finite_checkpoint_and_resumes_with_lower_lr(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = [*TINY, "--ckpt-every", 3, "--out-dir", run_dir]
    assert run(["train", *common, "--steps", 3, "--lr", "0.001"], capsys)[0] == 0
    saved = (run_dir / "last.pt").read_bytes()
    before = snapshot(tmp_path, exclude=[run_dir])
    rc, err = run(["train", *common, "--steps", 12, "--lr", "1e6"], capsys)
    msg = last_line(err)
    assert rc == 3 and "training diverged" in msg and "nan" in msg.lower()
    assert f"{run_dir / 'last.pt'} keeps the last finite state (step 3)" in msg and "--lr 100000" in msg
    assert (run_dir / "last.pt").read_bytes() == saved  # nothing non-finite reached the checkpoint
    assert snapshot(tmp_path, exclude=[run_dir]) == before
    rc, err = run(["train", *common, "--steps", 6, "--lr", "0.0001"], capsys)  # the advised resume works
    assert rc == 0
    state, config = load_checkpoint(run_dir / "last.pt")
    assert state["step"] == 6 and config["lr"] == 0.0001 and torch.isfinite(state["losses"]).all()


def test_divergence_before_any_checkpoint_says_so(tmp_path, capsys):
    rc, err = run(["train", *TINY, "--ckpt-every", 100, "--steps", 12, "--lr", "1e6", "--out-dir", tmp_path / "r"],
                  capsys)
    assert rc == 3 and "no checkpoint was written" in last_line(err) and not (tmp_path / "r" / "last.pt").exists()


# ----------------------------------------------------------------------------- 5. logs, temp files
def test_partial_log_line_and_stale_temp_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", *TINY, "--steps", 2, "--ckpt-every", 2, "--out-dir", run_dir], capsys)[0] == 0
    cut = len((run_dir / "log.jsonl").read_text().splitlines()) + 1
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # an append cut short by a file-size limit
    stale = [run_dir / ".last.pt.k3j2h1ab.tmp", run_dir / ".config.json.zz9y8x7w.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = run_dir / "notes.tmp"  # not a temp file of ours: left alone
    keep.write_text("mine")
    before = snapshot(tmp_path, exclude=[run_dir])
    rc, err = run(["train", *TINY, "--steps", 3, "--ckpt-every", 3, "--out-dir", run_dir], capsys)
    assert rc == 0 and f"{run_dir / 'log.jsonl'}: line {cut} is not valid JSON" in err
    records = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert snapshot(tmp_path, exclude=[run_dir]) == before


def test_checkpoint_write_hitting_a_file_size_limit(tmp_path, capsys):
    """Disk full / RLIMIT_FSIZE during a checkpoint write: one line naming the file, last.pt unchanged."""
    run_dir = tmp_path / "run"
    assert run(["train", *TINY, "--steps", 2, "--ckpt-every", 2, "--out-dir", run_dir], capsys)[0] == 0
    saved = (run_dir / "last.pt").read_bytes()
    limit = len(saved) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = snapshot(tmp_path, exclude=[run_dir])
    proc = subprocess.run(cli_cmd("train", *TINY, "--steps", 4, "--ckpt-every", 1, "--out-dir", run_dir),
                          env=subprocess_env(tmp_path), capture_output=True, text=True, preexec_fn=limit_file_size,
                          timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (f"patchddm train: error: {run_dir / 'last.pt'}: File too large "
                                      f"(while writing; the previous file is unchanged)")
    assert (run_dir / "last.pt").read_bytes() == saved
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert snapshot(tmp_path, exclude=[run_dir]) == before


# ----------------------------------------------------------------------------- 6. config values
@pytest.mark.parametrize("text,key,value", [
    ("steps: abc\n", "steps", "'abc'"), ("lr: fast\n", "lr", "'fast'"), ("model:\n  base_width: x\n", "model.base_width", "'x'"),
    ("model:\n  widht: 8\n", "model.widht", "8"), ('resume: "false"\n', "resume", "'false'"), ("steps: 3.7\n", "steps", "3.7"),
    ("steps: -5\n", "steps", "-5"), ("ckpt_every: -1\n", "ckpt_every", "-1"), ("batch_size: 0\n", "batch_size", "0"),
    ("method: patchdm\n", "method", "'patchdm'"), ("diffusion:\n  clip_x0: 1\n", "diffusion.clip_x0", "1"),
    ("betas: [0.9]\n", "betas", "[0.9]"), ("device: gpu\n", "device", "'gpu'"), ("stepz: 3\n", "stepz", "3"),
])
def test_bad_config_values_name_file_key_and_value(tmp_path, capsys, text, key, value):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    before = snapshot(tmp_path)
    rc, err = run(["train", "--config", cfg, "--out-dir", tmp_path / "run"], capsys)
    msg = last_line(err)
    assert rc == 2 and f"config file {cfg}" in msg and f"'{key}'" in msg and value in msg
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,expected", [
    (["train", "--steps", "-5"], "flag --steps: config key 'steps' = -5: expected an integer >= 1"),
    (["train", "--ckpt-every", "-1"], "flag --ckpt-every: config key 'ckpt_every' = -1: expected an integer >= 0"),
    (["train", "--batch-size", "0"], "flag --batch-size: config key 'batch_size' = 0: expected an integer >= 1"),
    (["train", "--steps", "3.7"], "argument --steps: invalid int value: '3.7'"),
    (["train", "--resume", "maybe"], "expected true/false, got 'maybe'"),
    (["sample", "--model", "m.pt", "--out", "o", "--cases", "0"], "argument --cases: expected an integer >= 1, got '0'"),
    (["sample", "--model", "m.pt", "--out", "o", "--ensemble", "0"], "argument --ensemble: expected an integer >= 1"),
    (["predict", "--model", "m", "--input", "x", "--out", "o", "--threshold", "nan"], "argument --threshold"),
])
def test_bad_flags(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    rc, err = run(argv + (["--out-dir", "run"] if argv[0] == "train" else []), capsys)
    assert rc == 2 and expected in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7. OS errors, devices, crashes
def test_output_path_that_is_a_file(world, capsys):
    blocker = world["root"] / "blocker"
    blocker.write_text("a file, not a folder")
    before = snapshot(world["root"])
    cases = [
        (predict_args(world, blocker), "--out must be a folder"),
        (["sample", "--model", world["ckpt"], "--out", blocker, "--quiet", "--ensemble", 1, "--sampling-steps", 1],
         "--out must be a folder"),
        (["train", *TINY, "--steps", 1, "--out-dir", blocker], "out_dir must be a folder"),
        (["preprocess", "--data", world["root"] / "ds", "--cache", blocker, "--quiet"], "--cache must be a folder"),
        (["evaluate", "--pred", world["case"], "--gt", world["root"] / "ds", "--out", blocker / "m.json"],
         "--out's folder must be a folder"),
    ]
    for argv, expected in cases:
        rc, err = run(argv, capsys)
        assert rc == 2 and str(blocker) in last_line(err) and expected in last_line(err), (argv[0], err)
    assert snapshot(world["root"]) == before


def test_output_folder_that_cannot_be_written(world, capsys, monkeypatch):
    """A read-only --out (simulated: these tests run as root, which ignores permission bits, so
    os.access is told the folder is read-only) gives one line naming the folder."""
    ro = world["root"] / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    before = snapshot(world["root"])
    for argv, flag in ((predict_args(world, ro), "--out"), (["train", *TINY, "--steps", 1, "--out-dir", ro], "out_dir"),
                       (["sample", "--model", world["ckpt"], "--out", ro, "--quiet"], "--out")):
        rc, err = run(argv, capsys)
        assert rc == 2 and last_line(err) == f"patchddm {argv[0]}: error: {ro}: {flag} folder is not writable"
    assert snapshot(world["root"]) == before


def test_symlink_loops_in_a_case_folder(world, capsys):
    os.symlink("loop", world["case"] / "loop")
    before = snapshot(world["root"])
    for argv in (predict_args(world, world["root"] / "p"),
                 ["preprocess", "--data", world["root"] / "ds", "--cache", world["root"] / "c", "--quiet"],
                 ["train", *TINY, "--data", world["root"] / "ds", "--steps", 1, "--out-dir", world["root"] / "r"]):
        rc, err = run(argv, capsys)
        assert rc == 2 and last_line(err).endswith(f"{world['case'] / 'loop'}: Too many levels of symbolic links")
    gt = world["root"] / "gt"
    gt.mkdir()
    os.symlink("x_seg.nii.gz", gt / "x_seg.nii.gz")  # a file that links to itself
    rc, err = run(["evaluate", "--pred", gt, "--gt", gt, "--out", world["root"] / "m.json"], capsys)
    assert rc == 2 and "x_seg.nii.gz" in last_line(err) and "symbolic links" in last_line(err)
    assert snapshot(world["root"], exclude=[world["root"] / "c", world["root"] / "r", world["root"] / "p"]) == {
        **before, "gt/x_seg.nii.gz": "link:x_seg.nii.gz"}


def test_cuda_requested_without_cuda(world, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = snapshot(world["root"])
    for argv in (["train", *TINY, "--steps", 1, "--out-dir", world["root"] / "r", "--device", "cuda"],
                 predict_args(world, world["root"] / "p", "--device", "cuda"),
                 ["sample", "--model", world["ckpt"], "--out", world["root"] / "s", "--device", "cuda:1"]):
        rc, err = run(argv, capsys)
        msg = last_line(err)
        assert rc == 2 and "--device cuda" in msg and "CUDA is not available on this machine" in msg
        assert "checkpoint" not in msg
    assert snapshot(world["root"]) == before


def test_header_claiming_20000_cubed_voxels(world, capsys):
    t1 = world["files"][0]
    img = nib.load(t1)
    hdr = img.header.copy()
    hdr.set_data_shape((20000, 20000, 20000))
    raw = world["root"] / "huge_t1.nii"
    with open(raw, "wb") as f:  # a header that claims 20000^3 voxels in front of 16^3 of data
        hdr.write_to(f)
        f.seek(int(hdr["vox_offset"]))
        f.write(np.asarray(img.dataobj, dtype=hdr.get_data_dtype()).tobytes())
    gz = world["root"] / "huge_t1.nii.gz"
    import gzip

    gz.write_bytes(gzip.compress(raw.read_bytes()))
    before = snapshot(world["root"])
    for bad in (raw, gz):
        rc, err = run(["predict", "--model", world["ckpt"], "--input", bad, *world["files"][1:], "--case-id", "big",
                       "--out", world["root"] / bad.name.replace(".", "_"), "--quiet"], capsys)
        msg = last_line(err)
        assert rc == 2 and str(bad) in msg and "header claims shape (20000, 20000, 20000)" in msg
        assert "corrupt or the file truncated" in msg
    assert snapshot(world["root"], exclude=[world["root"] / "huge_t1_nii", world["root"] / "huge_t1_nii_gz"]) == before


def test_unexpected_error_writes_a_crash_log(tmp_path, capsys, monkeypatch):
    from patchddm_fast.cli import plan

    def broken(args):
        return {}["a bug"]
    monkeypatch.setattr(plan, "run", broken)
    monkeypatch.setenv("PATCHDDM_CRASH_DIR", str(tmp_path / "crashes"))
    rc, err = run(["plan", "--gpu-memory", "8GB"], capsys)
    logs = list((tmp_path / "crashes").iterdir())
    assert rc == 1 and len(logs) == 1 and str(logs[0]) in err and "KeyError" in err
    assert len(err.strip().splitlines()) == 1
    text = logs[0].read_text()
    assert "Traceback" in text and "a bug" in text
