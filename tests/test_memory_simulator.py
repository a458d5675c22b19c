"""The memory simulator: hand counts, internal consistency, recipes, CLI."""
import json
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from patchddm_fast.analysis import CUDA_CONTEXT_BYTES, simulate
from patchddm_fast.analysis.tracker import MemoryTracker

TINY = dict(base_width=8, channel_mult=(1, 2, 2), groups=4)


def _conv_relu_tracker():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    x = torch.empty(1, 2, 8, 8, 8)
    tracker = MemoryTracker()
    tracker.register(conv.parameters(), "weights")
    tracker.register([x], "inputs")
    return conv, x, tracker


def test_hand_count_conv_relu_inference():
    # weight 4*2*27*4 B = 864, bias 16, x 2*512*4 = 4096, conv out and relu out 4*512*4 = 8192 each.
    with FakeTensorMode():
        conv, x, tracker = _conv_relu_tracker()
        with tracker:
            y = torch.relu(conv(x))
        assert tracker.peak == 864 + 16 + 4096 + 8192 + 8192   # conv out still alive while relu writes
        assert tracker.current == 864 + 16 + 4096 + 8192        # the conv output died
        del y


def test_hand_count_conv_relu_training_step():
    with FakeTensorMode():
        conv, x, tracker = _conv_relu_tracker()
        with tracker:
            loss = torch.relu(conv(x)).sum()
            # forward: relu saved its output (8192), the conv output died, the loss is 4 B
            assert tracker.current == 880 + 4096 + 8192 + 4
            loss.backward()
        # backward peak: threshold_backward writes g_r (8192) while the saved relu output and
        # the 4-byte seed gradient are alive: 880 + 4096 + 4 (loss) + 4 (seed) + 8192 + 8192.
        assert tracker.peak == 880 + 4096 + 4 + 4 + 8192 + 8192
        assert tracker.current == 880 + 4096 + 4 + 880         # + weight/bias gradients
        assert tracker.peak_where.startswith("setup [threshold_backward")


def test_breakdown_sums_to_peak_and_engine_beats_paper():
    paper = simulate("fullres", "train", size=16, recipe="paper", model_kwargs=TINY)
    engine = simulate("fullres", "train", size=16, recipe="engine", model_kwargs=TINY)
    for r in (paper, engine):
        assert sum(r.breakdown.values()) == r.peak_allocated_bytes
        assert r.peak_allocated_bytes <= r.peak_allocated_rounded_bytes <= r.peak_reserved_bytes
        assert r.peak_process_bytes == r.peak_reserved_bytes + r.cuda_context_bytes
        assert r.breakdown["optimizer_state"] == r.totals["optimizer_state"] == 2 * r.totals["weights"]
        json.dumps(r.to_dict())
    assert paper.settings["precision"] == "fp16" and paper.settings["ops"] == "reference"
    assert engine.peak_allocated_bytes < paper.peak_allocated_bytes


def test_warm_start_step_equals_second_real_step():
    for ckpt in ("none", "block"):
        two = simulate("patchddm", "train", size=16, checkpoint=ckpt, steps=2, model_kwargs=TINY)
        warm = simulate("patchddm", "train", size=16, checkpoint=ckpt, steps=1, warm_start=True, model_kwargs=TINY)
        assert two.peak_allocated_bytes == warm.peak_allocated_bytes


def test_checkpoint_modes_trade_memory_for_recompute():
    r = {m: simulate("patchddm", "train", size=64, checkpoint=m, model_kwargs=TINY)
         for m in ("none", "selective", "block", "level")}
    assert r["none"].recompute_fraction == r["selective"].recompute_fraction == 0.0
    assert 0.0 < r["block"].recompute_fraction < r["level"].recompute_fraction < 1.0
    assert r["none"].peak_allocated_bytes > r["selective"].peak_allocated_bytes > r["block"].peak_allocated_bytes
    offloaded = simulate("patchddm", "train", size=64, checkpoint="block", offload="all", model_kwargs=TINY)
    assert offloaded.peak_host_bytes > 0
    assert offloaded.peak_allocated_bytes < r["block"].peak_allocated_bytes


def test_inference_offload_and_tiling_cut_the_peak(monkeypatch):
    import patchddm_fast.model.execution.tiled as tiled

    monkeypatch.setattr(tiled, "SMALL_BYTES", 0)  # slab even the tiny test volumes
    plain = simulate("patchddm", "sample", size=32, model_kwargs=TINY)
    both = simulate("patchddm", "sample", size=32, offload="skips", tiled=True, model_kwargs=TINY)
    paper = simulate("patchddm", "sample", size=32, recipe="paper", model_kwargs=TINY)
    assert paper.settings["precision"] == "fp32" and paper.breakdown["gradients"] == 0
    assert both.peak_host_bytes > 0 and both.peak_allocated_bytes < plain.peak_allocated_bytes < paper.peak_allocated_bytes


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        simulate("unet", "train", size=64)
    with pytest.raises(ValueError, match="mode"):
        simulate("patchddm", "infer", size=64)
    with pytest.raises(ValueError, match="checkpoint"):
        simulate("patchddm", "train", size=16, checkpoint="everything", model_kwargs=TINY)
    with pytest.raises(ValueError, match="multiple of 4"):
        simulate("patchddm", "train", size=18, model_kwargs=TINY)


def test_full_size_simulation_takes_seconds():
    start = time.perf_counter()
    r = simulate("patchddm", "sample", size=256)
    assert time.perf_counter() - start < 60
    assert r.totals["weights"] == 24_260_299 * 4


def run_command(name, argv):
    """Parse and run one of patchddm_fast.cli.<name> the way the CLI does."""
    import argparse
    import importlib

    module = importlib.import_module(f"patchddm_fast.cli.{name}")
    parser = argparse.ArgumentParser(prog="patchddm")
    module.add_parser(parser.add_subparsers(dest="command"))
    return module.run(parser.parse_args([name, *argv]))


def test_memory_cli_json(capsys):
    assert run_command("memory", ["--method", "halfres", "--mode", "sample", "--size", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "halfres" and d["size"] == 64 and d["peak_allocated_bytes"] > d["breakdown"]["weights"]
    # the targets' name for the process peak: allocator reserved peak + the CUDA context
    assert d["process_peak_bytes"] == d["peak_reserved_bytes"] + d["cuda_context_bytes"] == d["peak_process_bytes"]
    assert d["cuda_context_bytes"] == CUDA_CONTEXT_BYTES


def _bare_network_eval_peak(recipe, size):
    """Live-tensor peak of one bare network evaluation (the old sample mode): weights, the
    conditioning in the recipe's dtype and x_t registered, then ``network_eval`` tracked."""
    from patchddm_fast.diffusion import steps as workload
    from patchddm_fast.model.execution.policy import ExecutionPolicy
    from patchddm_fast.model.execution.precision import NoScaler, Precision
    from patchddm_fast.model.unet import UNet3D

    settings = simulate_module().recipe_settings(recipe, "sample")
    precision = Precision(settings.precision, torch.device("cpu"), NoScaler())
    with FakeTensorMode(allow_non_fake_inputs=True), simulate_module().mkldnn_disabled():
        model = UNet3D.from_method("patchddm", **TINY).apply_policy(ExecutionPolicy(ops=settings.ops)).eval()
        tracker = MemoryTracker()
        tracker.register(model.parameters(), "weights")
        inputs = workload.eval_inputs(8, size, 1, cond_dtype=precision.dtype)
        tracker.register(inputs.values(), "inputs")
        with tracker:
            workload.network_eval(model, inputs, autocast=precision.autocast("cpu"))
    return tracker.peak


def simulate_module():
    import importlib

    return importlib.import_module("patchddm_fast.analysis.simulate")


@pytest.mark.parametrize("recipe,cond_bytes", [("engine", 2), ("paper", 4)])
def test_sample_mode_runs_the_real_sampler_and_counts_its_tensors(recipe, cond_bytes):
    """Sample mode runs segment_volume's device side.  At the network's peak the sampler holds,
    besides the weights and the network's own tensors, exactly: the conditioning (7 channels
    in the compute dtype: bf16 for the engine, fp32 for the paper), x (1 channel fp32), the
    network input (8 channels, the conditioning's dtype) and t (one int64) -- the padded
    image, the fp32 conditioning, the initial noise and the previous step's x0 and output are
    gone, so the whole sampler peaks exactly where one bare network evaluation does."""
    size = 32
    voxels = size ** 3
    r = simulate("patchddm", "sample", size=size, recipe=recipe, model_kwargs=TINY)
    closed_form = 7 * voxels * cond_bytes + voxels * 4 + 8 * voxels * cond_bytes + 8
    assert r.breakdown["sampler_state"] == closed_form
    assert sum(r.breakdown.values()) == r.peak_allocated_bytes
    assert r.peak_allocated_bytes == _bare_network_eval_peak(recipe, size)
    assert r.peak_process_bytes == r.peak_reserved_bytes + r.cuda_context_bytes
    assert r.to_dict()["process_peak_bytes"] == r.peak_process_bytes


def test_sample_mode_counts_the_samplers_conditioning_build():
    """HalfRes feeds the sampler an image of twice the network's edge.  With a tiny network the
    peak is the sampler's own work, which a bare network evaluation never sees: the padded
    image and scale_image's two full-resolution fp32 temporaries (2x, then - 1) before
    decimation -- 3 x 4 channels x 64^3 x 4 bytes besides the weights (the device copy of the
    image is already freed by then)."""
    r = simulate("halfres", "sample", size=32, model_kwargs=TINY)
    assert r.peak_where == "sampler_state"
    assert r.breakdown["sampler_state"] == 3 * 4 * 64 ** 3 * 4
    assert r.peak_allocated_bytes == r.breakdown["weights"] + 3 * 4 * 64 ** 3 * 4


def test_profile_without_gpu_exits_with_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: profile would run for real")
    assert run_command("profile", ["--method", "halfres", "--mode", "sample", "--size", "64"]) == 3
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_ops_are_the_reference_codes_order(dtype):
    """The backend's reference GroupNorm-SiLU is the paper's code, bit for bit, in every dtype:
    guided-diffusion's GroupNorm32 (GroupNorm of x.float(), cast back) then nn.SiLU -- so the
    simulator and the profiler model the paper recipe by running it, with no patching."""
    from patchddm_fast.model import backend

    class GroupNorm32(torch.nn.GroupNorm):  # guided-diffusion's normalization()
        def forward(self, x):
            return super().forward(x.float()).type(x.dtype)

    g = torch.Generator().manual_seed(0)
    x, bias_in = torch.randn(2, 8, 4, 4, 4, generator=g).to(dtype), torch.randn(2, 8, generator=g)
    norm = GroupNorm32(4, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
        norm.bias.copy_(torch.randn(8, generator=g))
        paper = torch.nn.SiLU()(norm(x + bias_in[:, :, None, None, None].to(dtype)))
        ours = backend.reference_group_norm_silu(x, norm.weight, norm.bias, 4, norm.eps, bias_in)
    assert ours.dtype == dtype and torch.equal(ours, paper)


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_profile_workload_runs_on_cpu(mode):
    """The GPU profiler's workload loop (timing, DDIM pass) on a tiny CPU network."""
    from patchddm_fast.analysis.profiling import _run_workload
    from patchddm_fast.analysis.simulate import recipe_settings
    from patchddm_fast.model.unet import UNet3D
    from patchddm_fast.model.execution.precision import resolve_precision

    model = UNet3D(in_channels=5, **TINY)
    times = []
    _run_workload(mode, model, resolve_precision("fp32", "cpu"), recipe_settings("engine", mode, precision="fp32"),
                  5, 16, 1, 2, 2, torch.device("cpu"), torch.Generator().manual_seed(0), times)
    assert len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.parametrize("method,mode,size,over,limit_gb", [
    ("patchddm", "train", 128, dict(), 2.0),                              # engine default: block checkpointing
    ("fullres", "train", 256, dict(checkpoint="level"), 12.0),
    ("patchddm", "sample", 256, dict(), 6.0),
    ("patchddm", "sample", 256, dict(offload="skips", tiled=True), 3.0),
], ids=["patchddm-train-128", "fullres-train-256-level", "sample-256", "sample-256-offload"])
def test_issue_targets_on_the_papers_network(method, mode, size, over, limit_gb):
    """The engine's simulated live-tensor peaks meet the project's targets (BENCHMARKS.md)."""
    r = simulate(method, mode, size=size, **over)
    assert r.totals["weights"] == (24_260_299 if method == "patchddm" else 24_257_950) * 4
    assert r.peak_allocated_bytes <= limit_gb * 1e9, r.peak_allocated_bytes / 1e9
