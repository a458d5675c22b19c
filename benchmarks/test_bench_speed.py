"""(b) CPU time of one training step and one network evaluation at 64^3 with the paper's full
network (24.3 M parameters), fp32: the paper recipe (reference ops, no checkpointing) against
the engine (fused ops, in-place skip averages; training with checkpointing on).

Both run in the same session, interleaved round by round (the machine is shared, so a
slow phase hits both), and the ratio engine/paper of the medians is stored in
``extra_info`` and the report.  Targets (issue 5): training step <= 1.3x with
checkpointing, network evaluation <= 1.0x.  Note that the engine's CPU convolutions run
oneDNN's forward (the ops backend) while the reference path uses ``F.conv3d``; subnormals
are flushed for both, as the Trainer does on CPU.
Run: ``pytest benchmarks/test_bench_speed.py --benchmark-only`` (about two minutes).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import pytest
import torch

from patchddm_fast.diffusion.schedule import Diffusion
from patchddm_fast.diffusion.steps import eval_inputs, network_eval, train_inputs, train_step
from patchddm_fast.model.execution.policy import ExecutionPolicy
from patchddm_fast.model.unet import UNet3D
from patchddm_fast.model.execution.precision import resolve_precision

SIZE = 64
PRESET = "patchddm"
EVAL_ROUNDS = 5
TRAIN_ROUNDS = 2
FP32 = resolve_precision("fp32", "cpu")


@pytest.fixture(scope="module", autouse=True)
def flush_denormals():
    """As the Trainer and sampler do on CPU (zero-initialised convolutions make subnormals,
    which x86 handles in microcode); the same setting for both recipes."""
    old = torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(old)


def _model(ops: str, recompute: str) -> UNet3D:
    torch.manual_seed(0)  # identical weights for every recipe
    return UNet3D.from_method(PRESET, policy=ExecutionPolicy(ops=ops, recompute=recompute))


def _timed(fn: Callable[[], object], into: List[float]) -> None:
    start = time.perf_counter()
    fn()
    into.append(time.perf_counter() - start)


def _record(bench_results, benchmark, workload: str, paper: List[float], engines: Dict[str, List[float]],
            target: float) -> None:
    p = statistics.median(paper)
    for name, times in engines.items():
        e = statistics.median(times)
        row = dict(workload=workload, paper_s=p, engine_s=e, engine_settings=name, ratio=e / p, target=target,
                   paper_rounds=paper, engine_rounds=times)
        bench_results["speed"].append(row)
        benchmark.extra_info[f"ratio[{name}]"] = e / p
        benchmark.extra_info[f"engine_s[{name}]"] = e
    benchmark.extra_info["paper_s"] = p


def test_cpu_network_evaluation(benchmark, bench_results):
    paper, engine = _model("reference", "none").eval(), _model("fused", "none").eval()
    inputs = eval_inputs(paper.config["in_channels"], SIZE, generator=torch.Generator().manual_seed(1))
    paper_t: List[float] = []
    engine_t: List[float] = []
    benchmark.pedantic(lambda: _timed(lambda: network_eval(engine, inputs, FP32.autocast()), engine_t),
                       setup=lambda: _timed(lambda: network_eval(paper, inputs, FP32.autocast()), paper_t),
                       rounds=EVAL_ROUNDS, warmup_rounds=1, iterations=1)
    # drop the warm-up round of both
    _record(bench_results, benchmark, "network evaluation (no_grad)", paper_t[1:],
            {"fused ops, in-place skip averages": engine_t[1:]}, target=1.0)
    with torch.no_grad():  # same network, same numbers (fp32)
        ref, out = network_eval(paper, inputs, FP32.autocast()), network_eval(engine, inputs, FP32.autocast())
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_cpu_training_step(benchmark, bench_results):
    diffusion = Diffusion()
    models = {"paper": _model("reference", "none"), "selective": _model("fused", "selective"),
              "block": _model("fused", "block")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    inputs = train_inputs(models["paper"].config["in_channels"], SIZE, generator=torch.Generator().manual_seed(1))
    times: Dict[str, List[float]] = {k: [] for k in models}

    def step(name: str) -> None:
        _timed(lambda: train_step(models[name], diffusion, opts[name], FP32, inputs), times[name])

    def others() -> None:  # interleave: paper and the block variant run before each timed round
        step("paper")
        step("block")

    benchmark.pedantic(lambda: step("selective"), setup=others, rounds=TRAIN_ROUNDS, iterations=1)
    _record(bench_results, benchmark, "training step", times["paper"],
            {"fused ops + selective checkpointing": times["selective"],
             "fused ops + block checkpointing": times["block"]}, target=1.3)
