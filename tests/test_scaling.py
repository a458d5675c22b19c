"""The data-parallel scaling model (patchddm_fast.analysis.scaling) against its closed forms."""
import pytest
import torch

from patchddm_fast.analysis.scaling import (BACKWARD_FRACTION, LINKS, Link, allreduce_seconds, backward_profile,
                                          bucket_ready_times, exposed_communication, ring_allreduce_bytes,
                                          step_estimate)
from patchddm_fast.analysis.simulate import ddp_bucket_sizes

TINY = dict(base_width=8, channel_mult=(1, 2), groups=4, enc_blocks=1, dec_blocks=2, mid_blocks=1)


def test_ring_allreduce_closed_form():
    for n in (1, 2, 4, 8):
        assert ring_allreduce_bytes(97.0e6, n) == pytest.approx(2 * (n - 1) / n * 97.0e6)
    link = Link("x", 10e9, 30e-6, "")
    assert allreduce_seconds(1e9, 1, link) == 0.0
    assert allreduce_seconds(1e9, 4, link) == pytest.approx(1.5e9 / 10e9 + 6 * 30e-6)
    with pytest.raises(ValueError):
        ring_allreduce_bytes(1.0, 0)


def test_profile_counts_every_parameter_once_and_buckets_match_ddp():
    from patchddm_fast.model.unet import UNet3D

    profile = backward_profile("patchddm", 16, TINY)
    model = UNet3D.from_method("patchddm", **TINY)
    assert sum(b for b, _ in profile) == 4 * sum(p.numel() for p in model.parameters())
    assert sum(s for _, s in profile) == pytest.approx(1.0)
    buckets = bucket_ready_times(profile, 1.0, first_cap=10_000, cap=40_000)
    # same packing as the simulator's DDP buckets (reverse registration order == backward order here)
    assert [b for b, _ in buckets] == ddp_bucket_sizes([4 * p.numel() for p in model.parameters()], 10_000, 40_000)
    assert [t for _, t in buckets] == sorted(t for _, t in buckets) and buckets[-1][1] == pytest.approx(1.0)


def test_overlap_limits():
    link = LINKS["ethernet"]
    buckets = [(25e6, 1.0), (25e6, 1.0), (10e6, 1.0)]  # everything ready only at the end: nothing hidden
    total, exposed = exposed_communication(buckets, 1.0, 8, link)
    assert total == pytest.approx(sum(allreduce_seconds(b, 8, link) for b, _ in buckets))
    assert exposed == pytest.approx(total)
    early = [(25e6, 0.0), (25e6, 0.1), (10e6, 0.2)]  # ready early and short: fully hidden
    assert exposed_communication(early, 1.0, 8, link)[1] == 0.0
    # one bucket ready at 0.9 of a 1 s backward that takes 0.3 s: 0.2 s exposed
    slow = Link("slow", 50e6 / 0.3, 0.0, "")  # 2 GPUs: 2 (N-1)/N x 50 MB = 50 MB on the wire
    assert exposed_communication([(50e6, 0.9)], 1.0, 2, slow)[1] == pytest.approx(0.2)


def test_step_estimate_on_one_gpu_is_the_compute_time():
    profile = backward_profile("patchddm", 16, TINY)
    one = step_estimate(1, LINKS["nvlink"], profile, compute_s=0.34)
    assert one["step_s"] == 0.34 and one["exposed_s"] == 0.0 and one["speedup"] == 1.0
    eight = step_estimate(8, LINKS["ethernet"], profile, compute_s=0.34)
    assert 0.34 <= eight["step_s"] <= 0.34 + eight["allreduce_s"]
    assert eight["speedup"] == pytest.approx(8 * 0.34 / eight["step_s"])
    assert BACKWARD_FRACTION == pytest.approx(2 / 3)
    assert torch.get_default_dtype() == torch.float32
