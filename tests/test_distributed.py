"""Data parallelism on the CPU: 2 real processes with gloo, the tiny network, a few steps.

The ranks are started with the environment torchrun gives them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) -- directly where a test must kill one rank or give each its
own working directory, through ``torch.distributed.run`` (``patchddm train --nproc 2`` and
the worker script) elsewhere.  References are single-process runs in this process.
"""
import json
import os
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

from patchddm_fast.training.checkpoint import load_checkpoint
from patchddm_fast.cli.main import main as cli_main
from patchddm_fast.training.cases import step_generators
from patchddm_fast.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
ARCH = dict(base_width=8, channel_mult=[1, 2], groups=4, enc_blocks=1, dec_blocks=2, mid_blocks=1)


def tiny(out_dir, **kw):
    cfg = dict(steps=STEPS, batch_size=1, model=ARCH, phantom_size=24, phantom_train=3, phantom_val=2, patch_size=16,
               lr=1e-3, ckpt_every=1, log_every=1, val_every=0, val_steps=2, out_dir=str(out_dir), progress=False,
               device="cpu", precision="fp32")
    cfg.update(kw)
    return cfg


def child_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv, world, cwds, **extra):
    """``python ARGV`` as ranks 0..world-1 (torchrun's environment, without its agent)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        procs.append(subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwds[rank], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=120):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def weights(path):
    return load_checkpoint(path)[0]["model"]


def max_relative_difference(a, b):
    """||a - b|| / ||b|| over the whole weight vector (float64).

    (Per tensor, biases that started at zero and hold a few Adam steps of ~1e-3 differ by up
    to ~3e-6 relative -- 1e-8 absolute, float32 rounding of their reduction order.)"""
    num = sum((a[k].double() - b[k].double()).square().sum() for k in b).sqrt()
    return float(num / sum(b[k].double().square().sum() for k in b).sqrt())


def write_config(path, cfg):
    path.write_text(json.dumps(cfg))
    return path


MODES = {"none": {}, "selective": dict(checkpoint="selective"), "block": dict(checkpoint="block"),
         "level": dict(checkpoint="level"), "offload": dict(offload="all"), "fused": dict(ops="fused"),
         "bf16": dict(precision="bf16", steps=1)}
MODE_COMMON = dict(steps=2, phantom_val=0, ckpt_every=0, log_every=0)
PREDICT = ["--ensemble", 3, "--steps", 2, "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank launch of tests/dist_worker.py running, in one process group: the
    uninterrupted 2-rank batch-1 run (each rank in its own working directory), every engine
    mode, and sharded prediction (3 cases: sharded cases; 1 case: spread ensemble)."""
    from synthetic_data import write_phantom_dataset

    root = tmp_path_factory.mktemp("dist")
    write_phantom_dataset(root / "brats", 3, (20, 24, 16))
    one_case = sorted((root / "brats").iterdir())[0]
    cwds = [root / "rank0", root / "rank1"]
    for c in cwds:
        c.mkdir()
    model = cwds[0] / "run" / "last.pt"
    jobs = [{"train": tiny("run")}]  # relative: each rank would write under its own cwd
    jobs += [{"train": tiny(root / "modes" / name, **{**MODE_COMMON, **kw})} for name, kw in MODES.items()]
    jobs += [{"cli": ["predict", "--model", model, "--input", root / "brats", "--out", root / "two_pred", *PREDICT]},
             {"cli": ["predict", "--model", model, "--input", one_case, "--out", root / "two_case", *PREDICT]}]
    spec = write_config(root / "jobs.json", json.loads(json.dumps(jobs, default=str)))
    started = time.perf_counter()
    results = finish(start_ranks([ROOT / "tests" / "dist_worker.py", spec], 2, cwds), timeout=400)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    ref = Trainer(tiny(root / "ref", batch_size=2))
    ref_history = ref.fit()
    return dict(root=root, ref=ref, ref_history=ref_history, two=model.parent, rank1_cwd=cwds[1], model=model,
                one_case=one_case, seconds=time.perf_counter() - started)


def test_batch_one_draw_is_the_single_process_draw():
    """Global index 0 of step k uses the (seed, k) key of the code before data parallelism."""
    for seed, step in ((0, 0), (3, 17)):
        old_rng = np.random.default_rng([seed, step])
        old_gen = torch.Generator().manual_seed(int(old_rng.integers(0, 2**62)))
        rng, gen = step_generators(seed, step, 0)
        assert rng.integers(1 << 30) == old_rng.integers(1 << 30)
        assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=old_gen))
        other, _ = step_generators(seed, step, 1)
        assert other.integers(1 << 62) != np.random.default_rng([seed, step]).integers(1 << 62)


def test_two_ranks_equal_one_rank_at_twice_the_batch_and_only_rank_zero_writes(runs):
    two = runs["two"]
    # rank 0 holds the run-folder lock (.lock) as a single-process run does
    assert sorted(p.name for p in two.iterdir()) == [".lock", "config.json", "last.pt", "log.jsonl"]
    assert not (runs["rank1_cwd"] / "run").exists(), "rank 1 wrote into its working directory"
    assert list(runs["rank1_cwd"].iterdir()) == []
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    state, _ = load_checkpoint(two / "last.pt")
    assert int(state["step"]) == STEPS and int(state["world_size"]) == 2
    assert max_relative_difference(state["model"], runs["ref"].model.state_dict()) < 1e-6
    np.testing.assert_allclose(state["losses"].numpy(), runs["ref_history"]["losses"], rtol=1e-6)
    # sharded validation: one Dice per validation case, in case order, close to the reference's
    val = json.loads(state["validations_json"])[-1]
    ref_val = runs["ref_history"]["validations"][-1]
    assert len(val["per_case"]) == len(ref_val["per_case"]) == 2
    np.testing.assert_allclose(val["per_case"], ref_val["per_case"], atol=1e-2)
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, STEPS + 1))


def test_killed_or_hung_rank_stops_the_other_and_resuming_is_exact(runs, tmp_path):
    cfg = write_config(tmp_path / "kill.json", tiny("run", phantom_val=0))
    train = ["-m", "patchddm_fast", "train", "--config", cfg]
    # 1. rank 1 SIGKILLs itself just before step index 2 (checkpoint 2 exists): rank 0 stops at once
    start = time.perf_counter()
    (rc0, _, err0), (rc1, _, _) = finish(start_ranks(train, 2, [tmp_path] * 2, PATCHDDM_DIST_FAULT="1:2",
                                                   PATCHDDM_DIST_TIMEOUT="30"))
    assert rc1 == -signal.SIGKILL
    assert rc0 == 2 and "rank 0 of 2 stopped at training step 3" in err0, err0[-2000:]
    assert int(load_checkpoint(tmp_path / "run" / "last.pt")[0]["step"]) == 2
    # 2. resumed; rank 1 hangs (SIGSTOP) before step index 3: rank 0 gives up after the 8 s timeout
    procs = start_ranks(train, 2, [tmp_path] * 2, PATCHDDM_DIST_FAULT="1:3:stop", PATCHDDM_DIST_TIMEOUT="8")
    try:
        _, err0 = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 2 and "rank 0 of 2 stopped at training step 4" in err0, err0[-2000:]
    assert "process-group timeout (8s" in err0
    assert int(load_checkpoint(tmp_path / "run" / "last.pt")[0]["step"]) == 3
    # 3. resumed through the launcher: `patchddm train --nproc 2` runs torch.distributed.run
    done = subprocess.run([sys.executable, *map(str, train), "--nproc", "2"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = weights(tmp_path / "run" / "last.pt"), weights(runs["two"] / "last.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert time.perf_counter() - start < 400


def test_every_engine_mode_under_ddp(runs, tmp_path):
    """Checkpointing modes (use_reentrant=False), offload and fused ops under 2-rank DDP train the
    weights of plain DDP (which equals one process at twice the batch, tested above); bf16
    autocast under DDP gives one bf16 process's weights at twice the batch."""
    modes = runs["root"] / "modes"
    plain = weights(modes / "none" / "last.pt")
    for name in MODES:
        if name not in ("none", "bf16"):
            assert max_relative_difference(weights(modes / name / "last.pt"), plain) < 1e-6, name
    ref = Trainer(tiny(tmp_path / "bf16", **{**MODE_COMMON, **MODES["bf16"], "batch_size": 2}))
    ref.fit()
    # two batch-1 bf16 convolutions round differently from one batch-2 convolution
    assert max_relative_difference(weights(modes / "bf16" / "last.pt"), ref.model.state_dict()) < 1e-2


def _arrays(folder):
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_sharded_predict_writes_what_one_rank_writes(runs, tmp_path):
    root = runs["root"]
    common = ["--model", runs["model"], *PREDICT]
    assert cli_main([str(a) for a in ["predict", "--input", root / "brats", "--out", tmp_path / "one", *common]]) == 0
    assert cli_main([str(a) for a in ["predict", "--input", runs["one_case"], "--out", tmp_path / "one_case",
                                      *common]]) == 0
    # 3 cases on 2 ranks: each rank wrote its cases, the same files as one process
    one, two = _arrays(tmp_path / "one"), _arrays(root / "two_pred")
    assert sorted(one) == sorted(two) and len(one) == 9
    for name in one:
        assert np.array_equal(one[name], two[name]), name
    summary = json.loads((root / "two_pred" / "predict.json").read_text())
    single = json.loads((tmp_path / "one" / "predict.json").read_text())
    assert [c["case"] for c in summary["cases"]] == [c["case"] for c in single["cases"]]
    assert [c["outputs"]["seg"].split("/")[-1] for c in summary["cases"]] == \
        [c["outputs"]["seg"].split("/")[-1] for c in single["cases"]]
    assert summary["world_size"] == 2
    # 1 case on 2 ranks: its ensemble was spread over the ranks and reduced in float64
    one, two = _arrays(tmp_path / "one_case"), _arrays(root / "two_case")
    assert sorted(one) == sorted(two) and len(one) == 3
    for name in one:
        if name.endswith("_seg.nii.gz"):
            assert np.array_equal(one[name], two[name]), name
        else:  # single process: float32 mean/var; reduced: float64 then float32 -- float32 rounding apart
            np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-6, err_msg=name)


def test_resume_refuses_another_global_batch(runs, tmp_path):
    import shutil

    shutil.copytree(runs["two"], tmp_path / "run")
    with pytest.raises(ValueError, match="world size 2 x batch 1 .*global batch 2.*world size 1 x batch 1"):
        Trainer(tiny(tmp_path / "run", steps=STEPS + 1, phantom_val=0)).fit()
    # 1 rank x batch 2 has the same global batch: allowed, and it continues the run
    history = Trainer(tiny(tmp_path / "run", steps=STEPS + 1, batch_size=2, phantom_val=0)).fit()
    assert len(history["losses"]) == STEPS + 1


def test_simulator_counts_ddp_buckets():
    from patchddm_fast.analysis.simulate import DDP_BUCKET_CAP_BYTES, ddp_bucket_sizes, simulate
    from patchddm_fast.analysis.tracker import GRADIENTS, WEIGHTS

    sizes = ddp_bucket_sizes([4] * 10, first_cap=8, cap=12)
    assert sizes == [8, 12, 12, 8] and sum(sizes) == 40
    big = ddp_bucket_sizes([10 * 2**20] * 6)
    assert big[0] == 10 * 2**20 and all(s <= DDP_BUCKET_CAP_BYTES + 10 * 2**20 for s in big)
    kw = dict(model_kwargs={k: tuple(v) if isinstance(v, list) else v for k, v in ARCH.items()}, size=16,
              recipe="engine", ops="reference", steps=1, warm_start=True)
    plain, ddp = simulate(**kw), simulate(**kw, ddp=True)
    grad_bytes = plain.totals[WEIGHTS]  # fp32 parameters: one gradient copy has their size
    assert ddp.breakdown[GRADIENTS] - plain.breakdown[GRADIENTS] == grad_bytes
    assert ddp.peak_allocated_bytes - plain.peak_allocated_bytes == grad_bytes


def test_sharding_helpers_and_reduction_in_one_process(monkeypatch):
    from patchddm_fast.training import distributed

    items = list("abcdefg")
    shards = [distributed.shard(items, distributed.DistContext(r, 3)) for r in range(3)]
    assert shards == [list("adg"), list("be"), list("cf")]
    assert list(distributed.global_indices(distributed.DistContext(2, 4), 3)) == [6, 7, 8]
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    mean, var = distributed.reduce_ensemble(x, 5, distributed.DistContext())
    ref = x.double().numpy()
    np.testing.assert_array_equal(mean.numpy(), ref.mean(0).astype(np.float32))
    np.testing.assert_allclose(var.numpy(), ref.var(0), rtol=1e-6)
    with pytest.raises(ValueError, match="global batch 2.*global batch 4"):
        distributed.check_resume_world("x.pt", 2, 1, 4, 1)
    distributed.check_resume_world("x.pt", 2, 1, 1, 2)  # same global batch: allowed
    assert cli_main(["train", "--nproc", "0"]) == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(["train", "--nproc", "2"]) == 2  # under torchrun already


def test_ensemble_members_are_the_full_ensembles_members():
    """segment_volume(members=...) skips the others' network passes but not their noise."""
    from patchddm_fast.diffusion.schedule import Diffusion
    from patchddm_fast.model.unet import UNet3D
    from patchddm_fast.sampling.segment import segment_volume

    torch.manual_seed(0)
    model = UNet3D.from_method("patchddm", **{k: tuple(v) if isinstance(v, list) else v for k, v in ARCH.items()})
    image = torch.rand(4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(method="patchddm", ensemble=3, steps=2, seed=5, progress=False, keep_samples=True)
    for eta in (0.0, 1.0):  # eta > 0 draws noise at every step too
        full = segment_volume(model, Diffusion(), image, eta=eta, **kw).samples
        part = segment_volume(model, Diffusion(), image, eta=eta, members=[2, 0], **kw).samples
        assert torch.equal(part, full[[0, 2]])
    with pytest.raises(ValueError, match="members"):
        segment_volume(model, Diffusion(), image, members=[3], **kw)
