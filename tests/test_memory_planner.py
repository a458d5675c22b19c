"""The planner: its choice fits its budget in the simulator, and nothing faster does."""
import pytest

from patchddm_fast.analysis import fits_budget, oom_advice, plan, simulate
from patchddm_fast.core.units import parse_bytes
from patchddm_fast.analysis.allocator import CUDA_CONTEXT_BYTES, MiB

TINY = dict(base_width=8, channel_mult=(1, 2, 2), groups=4)
SETTINGS_KEYS = {"checkpoint", "offload", "precision", "patch_size", "ops", "tiled"}


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10 ** 9 and parse_bytes("8 GiB") == 8 * 2 ** 30
    assert parse_bytes("512MB") == 512 * 10 ** 6 and parse_bytes("1.5gb") == 15 * 10 ** 8
    assert parse_bytes(10 ** 9) == 10 ** 9
    for bad in ("8 parsecs", "GB", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def _process(checkpoint, size=64):
    r = simulate("patchddm", "train", size=size, checkpoint=checkpoint, steps=1, warm_start=True, model_kwargs=TINY)
    return r.peak_reserved_bytes + r.cuda_context_bytes


def test_choice_fits_and_nothing_faster_does():
    # A budget between what "none" and "selective" need forces the planner past "none".
    budget = (_process("none") + _process("selective")) // 2
    p = plan(budget, method="patchddm", mode="train", headroom=0.0, patch_sizes=(64, 32), model_kwargs=TINY)
    assert p.fits and set(p.settings) == SETTINGS_KEYS
    assert p.settings["checkpoint"] != "none" and p.settings["patch_size"] == 64
    assert fits_budget(p.report, budget, headroom=0.0)[0]
    assert p.predicted_process_bytes <= budget
    tried_before = p.candidates[:-1]
    assert tried_before and not any(c.fits for c in tried_before)
    assert p.candidates[-1].fits


def test_nothing_fits_reports_the_smallest_need():
    p = plan(CUDA_CONTEXT_BYTES + 1 * MiB, method="patchddm", mode="sample", headroom=0.0, model_kwargs=TINY, size=64)
    assert not p.fits and p.report is None
    assert p.predicted_process_bytes == min(c.peak_process_bytes for c in p.candidates)
    assert "nothing fits" in p.format_text()


def test_oom_advice_names_the_plan():
    msg = oom_advice(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "patchddm", "sample",
                     gpu_memory="40GB")
    assert "CUDA out of memory" in msg and "--precision auto" in msg


def test_full_size_plan_fits_fullres_training_into_12gb():
    p = plan("12GB", method="fullres", mode="train")
    assert p.fits and p.settings["checkpoint"] in ("block", "level")
    assert p.predicted_process_bytes <= 12 * 10 ** 9 and p.predicted_peak_bytes <= 12 * 10 ** 9


def test_plan_cli(capsys):
    from test_memory_simulator import run_command

    assert run_command("plan", ["--gpu-memory", "40GB", "--method", "halfres", "--mode", "sample"]) == 0
    assert "settings:" in capsys.readouterr().out
